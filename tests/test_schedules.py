import math
import re

import pytest
import torch

from difflab.schedules import (
    MAX_T,
    Schedule,
    betas_from_alpha_bar,
    broadcast,
    cosine_alpha_bar,
    cosine_betas,
    geometric_sigmas,
    is_shared,
    karras_sigmas,
    linear_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    sigmoid_betas,
)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "sigmoid"])
@pytest.mark.parametrize("T", [1, 7, 1000])
def test_every_schedule_is_valid_for_any_T(name, T):
    s = Schedule.make(name, T=T)
    assert s.T == T and s.betas.dtype == torch.float64
    assert ((s.betas > 0) & (s.betas < 1)).all()
    assert (s.alpha_bar.diff() < 0).all()  # strictly noisier with t


def test_linear_endpoints_at_T_1000():
    s = Schedule.make("linear", T=1000)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert s.alpha_bar[-1].item() < 1e-4  # ends near pure noise


def test_cosine_matches_its_defining_formula():
    T, s_off = 1000, 0.008
    s = Schedule.make("cosine", T=T)
    f = lambda t: math.cos((t + s_off) / (1 + s_off) * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f((i + 1) / T) / f(0) for i in range(T)], dtype=torch.float64)
    unclipped = s.betas < 0.999
    # betas clipped at 0.999 only at the very end; before that alpha_bar is exactly f(t)/f(0)
    first_clip = int((~unclipped).nonzero()[0]) if (~unclipped).any() else T
    assert first_clip >= T - 2
    torch.testing.assert_close(s.alpha_bar[:first_clip], expected[:first_clip], rtol=1e-10, atol=1e-13)
    assert s.betas.max().item() <= 0.999
    torch.testing.assert_close(cosine_alpha_bar(torch.tensor(0.0)), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("T, s_off", [(1000, 0.008), (50, 0.02)])
def test_cosine_noise_has_the_product_form(T, s_off):
    """An independent form of Nichol & Dhariwal's schedule: with u = (t + s) / (1 + s) pi / 2,
    1 - cos^2(u) / cos^2(u0) = sin(u + u0) sin(u - u0) / cos^2(u0). It checks the noise fraction
    1 - alpha_bar to full relative precision, where it is tiny (4e-5 at the first step), so an
    f(0) not squared (alpha_bar off by 8e-5 everywhere) is off by a factor of 3 at the first step."""
    def noise(t):  # 1 - alpha_bar at continuous t in [0, 1]
        u0, u = (torch.tensor([0.0, t], dtype=torch.float64) + s_off) / (1 + s_off) * math.pi / 2
        return (torch.sin(u + u0) * torch.sin(u - u0) / torch.cos(u0) ** 2).item()

    sched = Schedule.make("cosine", T=T, s=s_off)
    expected = torch.tensor([noise((i + 1) / T) for i in range(T)], dtype=torch.float64)
    keep = sched.betas < 0.999  # the clipped tail follows the clip, not the formula
    torch.testing.assert_close((1 - sched.alpha_bar)[keep], expected[keep], rtol=1e-9, atol=0)
    for t in (0.0, 0.001, 0.5, 0.9):
        ab = cosine_alpha_bar(torch.tensor(t, dtype=torch.float64), s_off).item()
        assert 1 - ab == pytest.approx(noise(t), rel=1e-9, abs=1e-16)
    if T == 1000:
        assert sched.betas[0].item() == pytest.approx(4.13e-5, rel=2e-3)  # improved-diffusion's first cosine beta


def test_zero_terminal_snr_rescale():
    base = Schedule.make("linear", T=1000)
    z = Schedule.make("linear", T=1000, zero_terminal_snr=True)
    assert z.alpha_bar[-1].item() == 0.0  # exactly
    assert z.betas[-1].item() == 1.0
    assert z.alpha_bar[0].item() == pytest.approx(base.alpha_bar[0].item(), rel=1e-12)
    assert (z.alpha_bar.diff() < 0).all()
    # the shift/scale is affine in sqrt(alpha_bar)
    r = rescale_zero_terminal_snr(base.betas)
    torch.testing.assert_close(r, z.betas)
    sq_b, sq_z = base.alpha_bar.sqrt(), z.alpha_bar.sqrt()
    slope = (sq_z[0] - sq_z[-1]) / (sq_b[0] - sq_b[-1])
    torch.testing.assert_close(sq_z, (sq_b - sq_b[-1]) * slope, rtol=0, atol=1e-12)


def test_betas_from_alpha_bar_inverts_cumprod():
    betas = Schedule.make("cosine", T=50).betas
    torch.testing.assert_close(betas_from_alpha_bar(torch.cumprod(1 - betas, 0)), betas, rtol=1e-10, atol=1e-14)


def test_respacing_reproduces_alpha_bar_at_kept_steps():
    s = Schedule.make("linear", T=1000)
    kept = torch.tensor([0, 9, 99, 500, 999])
    r = s.respace(kept)
    torch.testing.assert_close(r.alpha_bar, s.alpha_bar[kept], rtol=1e-12, atol=0)
    assert r.timesteps.tolist() == kept.tolist() and r.T == 5
    # respacing a respaced schedule keeps the original indices
    rr = r.respace([0, 2, 4])
    assert rr.timesteps.tolist() == [0, 99, 999]
    torch.testing.assert_close(rr.alpha_bar, s.alpha_bar[[0, 99, 999]], rtol=1e-12, atol=0)


def test_continuous_view_interpolates_and_inverts():
    s = Schedule.make("cosine", T=100)
    ints = torch.arange(100)
    torch.testing.assert_close(s.alpha_bar_at(ints.double()), s.alpha_bar, rtol=0, atol=0)
    assert s.alpha_bar_at(torch.tensor(-1)).item() == 1.0
    t = torch.tensor([0.25, 3.5, 57.9, 98.99], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.sigma_at(t)), t, rtol=0, atol=1e-9)
    ab = s.alpha_bar_at(t)
    assert ((ab < s.alpha_bar_at(t.floor())) & (ab > s.alpha_bar_at(t.ceil()))).all()
    torch.testing.assert_close(s.log_snr_at(t), torch.log(ab / (1 - ab)))
    torch.testing.assert_close(
        s.continuous(torch.tensor([0.0, 1.0])), torch.tensor([1.0, s.alpha_bar[-1].item()]).double()
    )
    torch.testing.assert_close(s.sigmas, ((1 - s.alpha_bar) / s.alpha_bar).sqrt())


def test_ve_sigmas():
    g = geometric_sigmas(0.01, 50.0, 10)
    ratios = g[1:] / g[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand(9), rtol=1e-12, atol=0)
    assert g[0].item() == pytest.approx(0.01) and g[-1].item() == pytest.approx(50.0)
    k = karras_sigmas(0.002, 80.0, 40, rho=7.0)
    assert k[0].item() == pytest.approx(0.002, rel=1e-12) and k[-1].item() == pytest.approx(80.0, rel=1e-12)
    i = torch.arange(40, dtype=torch.float64) / 39
    ref = (0.002 ** (1 / 7) + i * (80.0 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(k, ref, rtol=1e-12, atol=0)
    # a VE ladder as a VP schedule has exactly those sigmas
    ve = Schedule.from_sigmas(k)
    torch.testing.assert_close(ve.sigmas, k, rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "betas, match",
    [
        ([0.1, 0.0, 0.2], r"beta\[1\] = 0.0"),
        ([0.1, -0.1], r"beta\[1\]"),
        ([0.1, 1.5], r"\(0, 1\)"),
        ([1.0, 0.5], r"beta\[0\] = 1.0"),
        ([float("nan"), 0.1], r"beta\[0\]"),
        ([], "T >= 1"),
    ],
)
def test_bad_betas_are_rejected(betas, match):
    with pytest.raises(ValueError, match=match):
        Schedule(betas)


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="T .* must be an integer >= 1"):
        Schedule.make("linear", T=0)
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        Schedule.make("quadratic")
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        Schedule.make("linear", T=10).respace([3, 10])
    with pytest.raises(ValueError, match=r"\[-1, 9\]"):
        Schedule.make("linear", T=10).alpha_bar_at(torch.tensor(12))


# ---------------------------------------------------------------- config round trips
def _every_kind_of_schedule():
    base = Schedule.make("cosine", T=50)
    return {
        "linear": Schedule.make("linear", T=20),
        "cosine-s": Schedule.make("cosine", T=30, s=0.02),
        "scaled_linear": Schedule.make("scaled_linear", T=25),
        "sigmoid": Schedule.make("sigmoid", T=10, start=-3.0),
        "ztsnr": Schedule.make("linear", T=40, zero_terminal_snr=True),
        "betas": Schedule(torch.linspace(1e-3, 0.3, 12, dtype=torch.float64) ** 1.5 + 1e-9, name="mine"),
        "sigmas": Schedule.from_sigmas(geometric_sigmas(0.01, 30.0, 15)),
        "ve-karras": Schedule.ve(0.002, 80.0, 18, spacing="karras", rho=5.0),
        "ve-geometric": Schedule.ve(0.01, 50.0, 20),
        "respaced": base.respace([0, 7, 19, 33, 49]),
        "respaced twice": base.respace(range(0, 50, 2)).respace([0, 3, 10, 24]),
    }


@pytest.mark.parametrize("kind", list(_every_kind_of_schedule()))
def test_schedule_config_round_trips_exactly_through_json(kind):
    import json

    schedule = _every_kind_of_schedule()[kind]
    config = json.loads(json.dumps(schedule.to_config()))  # what a manifest stores
    again = Schedule.from_config(config)
    assert torch.equal(again.betas, schedule.betas)  # bit for bit, not approximately
    assert torch.equal(again.timesteps, schedule.timesteps)
    assert again.name == schedule.name and again.to_config() == config


def test_schedule_config_changes_with_what_it_describes():
    # a config that ignored its arguments would round-trip trivially: these must differ
    a, b = Schedule.make("cosine", T=30), Schedule.make("cosine", T=30, s=0.02)
    assert not torch.equal(Schedule.from_config(a.to_config()).betas, Schedule.from_config(b.to_config()).betas)
    r = Schedule.make("linear", T=20).respace([0, 5, 19])
    assert Schedule.from_config(r.to_config()).timesteps.tolist() == [0, 5, 19]


@pytest.mark.parametrize(
    "config, words",
    [
        ({"name": "cosine"}, "kind"),
        ({"kind": "bogus"}, "unknown schedule kind 'bogus'"),
        ({"kind": "named", "name": "cosine", "T": 10, "colour": 1}, "unknown ['colour']"),
        ({"kind": "respaced", "timesteps": [0, 1]}, "missing ['base']"),
        ({"kind": "named", "name": "warp"}, "unknown schedule 'warp'"),
        ({"kind": "ve", "spacing": "linear"}, "'geometric' or 'karras'"),
        ({"kind": "sigmas", "sigmas": [1.0, 0.5]}, "strictly increasing"),
    ],
)
def test_bad_schedule_configs_are_refused_by_name(config, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        Schedule.from_config(config)


def test_a_named_schedule_refuses_options_of_another():
    with pytest.raises(ValueError, match=r"schedule 'linear' takes no option\(s\) \['s'\]"):
        Schedule.from_config({"kind": "named", "name": "linear", "T": 10, "s": 0.02})


# ---------------------------------------------------------------- found by mutation testing
# (benchmarks/mutation.py): each test below kills mutants that the tests above let through.
def test_the_makers_defaults_are_the_papers_values():
    """Defaults are part of the contract: T = 1000, cosine s = 0.008, SD's scaled-linear ends,
    the sigmoid's [-6, 6], NCSN's ladder 0.01..50 and Karras's 0.002..80 with rho = 7."""
    assert linear_betas().shape == (1000,) and cosine_betas().shape == (1000,)
    assert scaled_linear_betas().shape == (1000,) and sigmoid_betas().shape == (1000,)
    assert Schedule.make().T == 1000 and Schedule.make().name == "linear"
    torch.testing.assert_close(Schedule.make().betas, linear_betas(1000, 1e-4, 0.02), rtol=0, atol=0)
    t = torch.tensor([0.1, 0.7], dtype=torch.float64)
    torch.testing.assert_close(cosine_alpha_bar(t), cosine_alpha_bar(t, 0.008), rtol=0, atol=0)
    torch.testing.assert_close(sigmoid_betas(), sigmoid_betas(1000, 1e-4, 0.02, -6.0, 6.0), rtol=0, atol=0)
    torch.testing.assert_close(geometric_sigmas(), geometric_sigmas(0.01, 50.0, 10), rtol=0, atol=0)
    torch.testing.assert_close(karras_sigmas(), karras_sigmas(0.002, 80.0, 40, 7.0), rtol=0, atol=0)
    ve = Schedule.ve()
    assert ve.T == 1000 and ve.name == "ve-geometric"
    torch.testing.assert_close(ve.sigmas, geometric_sigmas(0.01, 50.0, 1000), rtol=1e-9, atol=0)
    karras = Schedule.ve(spacing="karras")
    torch.testing.assert_close(karras.sigmas, karras_sigmas(0.01, 50.0, 1000, 7.0), rtol=1e-9, atol=0)


def test_scaled_linear_and_sigmoid_match_their_formulas_in_float64():
    """Written out independently, in float64 (a float32 linspace is off by ~1e-8)."""
    sl = scaled_linear_betas(5, 0.0004, 0.0144)  # sqrt: 0.02 .. 0.12 in steps of 0.025
    expected = torch.tensor([(0.02 + 0.025 * i) ** 2 for i in range(5)], dtype=torch.float64)
    assert sl.dtype == torch.float64
    torch.testing.assert_close(sl, expected, rtol=1e-14, atol=0)
    sg = sigmoid_betas(3, 0.001, 0.011, -2.0, 2.0)
    expected = torch.tensor([0.001 + 0.01 / (1 + math.exp(-x)) for x in (-2.0, 0.0, 2.0)], dtype=torch.float64)
    assert sg.dtype == torch.float64
    torch.testing.assert_close(sg, expected, rtol=1e-14, atol=0)
    assert sigmoid_betas(4, 1e-4, 0.02, -1.0 / 3, 1.0 / 3).dtype == torch.float64


def test_coefficients_are_float64_whatever_the_input():
    """Python lists and float32 tensors come in; the schedule math runs in float64 all the same."""
    ab = [0.9, 0.5, 0.1 + 1e-9]
    out = betas_from_alpha_bar(ab)
    assert out.dtype == torch.float64
    assert out[2].item() == pytest.approx(1 - (0.1 + 1e-9) / 0.5, rel=1e-13)
    betas = Schedule.make("linear", T=50).betas.float()
    torch.testing.assert_close(
        rescale_zero_terminal_snr(betas), rescale_zero_terminal_snr(betas.double()), rtol=0, atol=0
    )  # the float32 values, converted first, then everything in float64
    s = Schedule.make("linear", T=100)
    assert s.sigma_to_t(1.5).dtype == torch.float64
    exact = s.sigma_to_t(torch.tensor(1.0 / 3, dtype=torch.float64)).item()
    assert s.sigma_to_t(1.0 / 3).item() == pytest.approx(exact, rel=1e-14)
    third = s.continuous(1.0 / 3)
    assert third.dtype == torch.float64
    at = s.alpha_bar_at(torch.tensor(100 / 3 - 1.0, dtype=torch.float64)).item()
    assert third.item() == pytest.approx(at, rel=1e-13)
    t32 = torch.tensor(0.3, dtype=torch.float32)  # interpolated in float64, not in the input's float32
    assert s.alpha_bar_at(t32).item() == s.alpha_bar_at(t32.double()).item()
    coef = broadcast(torch.tensor([0.5, 2.0], dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float32))
    assert coef.dtype == torch.float32 and coef.shape == (2, 1)


def test_argument_limits_are_exactly_the_documented_ones():
    for bad in (2.5, True, 0, MAX_T + 1):
        with pytest.raises(ValueError, match=r"T \(number of diffusion steps\) must be an integer >= 1"):
            linear_betas(bad)
    assert linear_betas(MAX_T).shape == (MAX_T,)  # the limit itself is allowed
    assert Schedule(torch.full((MAX_T,), 1e-4)).T == MAX_T
    for lo, hi in ((0.0, 1.0), (1.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match=rf"^need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}$"):
            geometric_sigmas(lo, hi, 3)
    with pytest.raises(ValueError, match=r"beta\[1\] = 0.0"):
        Schedule([0.1, 0.0])  # the last beta may be 1, never 0
    assert Schedule([0.1, 1.0]).alpha_bar[-1].item() == 0.0
    s = Schedule.make("linear", T=10)
    for t in (-2, 10):
        with pytest.raises(ValueError, match=rf"^timestep index must lie in \[-1, 9\], got {t}$"):
            s.alpha_bar_at(torch.tensor(t))
    for t in (-1.001, 9.001):
        with pytest.raises(ValueError, match=rf"^timestep must lie in \[-1, 9\], got {t}$"):
            s.alpha_bar_at(torch.tensor(t, dtype=torch.float64))
    # within round-off of the ends (1e-9) fractional t is clamped onto the grid, exactly
    ends = torch.tensor([-1.0 - 1e-10, 9.0 + 1e-10, 9.0 + 1e-9], dtype=torch.float64)  # the last: the edge itself
    assert s.alpha_bar_at(ends).tolist() == [1.0, s.alpha_bar[-1].item(), s.alpha_bar[-1].item()]
    for u in (-0.5, 1.5):
        with pytest.raises(ValueError, match=rf"^continuous time must lie in \[0, 1\], got {u}$"):
            s.continuous(u)
    ve = Schedule.ve(0.01, 50.0, 10)
    with pytest.raises(ValueError, match=r"^sigma beyond the schedule's maximum 50, got 60$"):
        ve.sigma_to_t(60.0)
    # the check is relative: with alpha_bar_T ~ 1e-17 (linear, T = 10) an absolute tolerance on alpha_bar let
    # any sigma through, silently mapped to T - 1
    steep = Schedule.make("linear", T=10)
    assert steep.alpha_bar[-1] < 1e-15
    with pytest.raises(ValueError, match="sigma beyond the schedule's maximum"):
        steep.sigma_to_t(10 * steep.sigmas[-1].item())
    assert steep.sigma_to_t(steep.sigmas[-1]).item() == pytest.approx(9.0, abs=1e-9)
    assert ve.sigma_to_t(ve.sigmas[-1]).item() == pytest.approx(9.0, abs=1e-9)  # the maximum itself is fine
    # a hair beyond it (within the 1e-9 relative round-off allowance) is the last step exactly
    ab = ve.alpha_bar[-1].item() - 5e-13
    assert ve.sigma_to_t(math.sqrt((1 - ab) / ab)).item() == 9.0


def test_sigma_to_t_lands_exactly_on_grid_points():
    """On a grid point the inverse gives that index, whichever side a search would round to."""
    s = Schedule.make("cosine", T=20)
    t = torch.arange(-1, 20, dtype=torch.float64)
    sigma = torch.cat([torch.zeros(1, dtype=torch.float64), s.sigmas])
    torch.testing.assert_close(s.sigma_to_t(sigma), t, rtol=0, atol=1e-9)
    mid = s.sigma_at(torch.tensor([0.5, 18.5], dtype=torch.float64))
    torch.testing.assert_close(s.sigma_to_t(mid), torch.tensor([0.5, 18.5], dtype=torch.float64), rtol=0, atol=1e-9)


def test_short_chains_clip_the_first_log_variance_to_the_second():
    """beta tilde is 0 at t = 0: its log is the next step's (T = 2), or beta itself when T = 1."""
    f64 = dict(dtype=torch.float64)
    two = Schedule([0.1, 0.2])
    bt1 = 0.2 * (1 - 0.9) / (1 - 0.9 * 0.8)
    torch.testing.assert_close(two.posterior_log_variance_clipped, torch.log(torch.tensor([bt1, bt1], **f64)))
    torch.testing.assert_close(two.large_log_variance, torch.log(torch.tensor([bt1, 0.2], **f64)))
    one = Schedule([0.3])
    torch.testing.assert_close(one.posterior_log_variance_clipped, torch.log(torch.tensor([0.3], **f64)))
    three = Schedule([0.1, 0.2, 0.3])
    ab = torch.tensor([0.9, 0.72, 0.504], dtype=torch.float64)
    bt = torch.tensor([0.0, 0.2 * 0.1 / 0.28, 0.3 * 0.28 / 0.496], dtype=torch.float64)
    torch.testing.assert_close(three.posterior_variance, bt)
    torch.testing.assert_close(three.posterior_log_variance_clipped, torch.log(bt[[1, 1, 2]]))
    torch.testing.assert_close(three.large_log_variance, torch.log(torch.stack([bt[1], bt.new_tensor(0.2),
                                                                                bt.new_tensor(0.3)])))  # fmt: skip
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    betas = torch.tensor([0.1, 0.2, 0.3], **f64)
    torch.testing.assert_close(three.posterior_mean_coef_x0, betas * prev.sqrt() / (1 - ab))
    torch.testing.assert_close(three.posterior_mean_coef_xt, (1 - prev) * (1 - betas).sqrt() / (1 - ab))


def test_names_and_configs_say_what_built_the_schedule():
    assert Schedule([0.1, 0.2]).name == "custom"
    assert Schedule.make("cosine", T=30, s=0.02).to_config() == {
        "kind": "named", "name": "cosine", "T": 30, "zero_terminal_snr": False, "s": 0.02}  # fmt: skip
    z = Schedule.make("linear", T=20, zero_terminal_snr=True)
    assert z.name == "linear+ztsnr" and Schedule.make("linear", T=20).name == "linear"
    assert z.to_config()["zero_terminal_snr"] is True
    sig = Schedule.from_sigmas([0.5, 1.0, 4.0])
    assert sig.name == "ve" and sig.to_config() == {"kind": "sigmas", "sigmas": [0.5, 1.0, 4.0], "name": "ve"}
    assert Schedule.from_config({"kind": "sigmas", "sigmas": [0.5, 1.0]}).name == "ve"
    assert Schedule.from_config({"kind": "sigmas", "sigmas": [0.5, 1.0], "name": "mine"}).name == "mine"
    assert Schedule.from_config({"kind": "betas", "betas": [0.1, 0.2]}).name == "custom"
    assert Schedule.ve(0.1, 10.0, 5, spacing="karras", rho=3.0).name == "ve-karras"
    assert Schedule.from_sigmas([1.0]).T == 1  # a single level is a ladder too
    torch.testing.assert_close(Schedule.ve(0.1, 10.0, 5).sigmas, geometric_sigmas(0.1, 10.0, 5), rtol=1e-9, atol=0)
    torch.testing.assert_close(Schedule.ve(0.1, 10.0, 5, spacing="karras", rho=3.0).sigmas,
                               karras_sigmas(0.1, 10.0, 5, 3.0), rtol=1e-9, atol=0)  # fmt: skip
    base = Schedule.make("linear", T=20)
    r = base.respace([9, 0, 19, 9])  # unsorted, repeated: kept once each, ascending
    assert r.timesteps.tolist() == [0, 9, 19] and r.name == "linear[3]"
    assert Schedule.make("linear", T=20).respace([7]).T == 1
    # to_config hands out a copy: editing it leaves the schedule as it was
    config = r.to_config()
    config["base"]["T"] = 5
    config["timesteps"].append(3)
    assert r.to_config()["base"]["T"] == 20 and r.to_config()["timesteps"] == [0, 9, 19]


def test_schedule_error_messages_name_the_allowed_values():
    """Exact messages: what is allowed, spelled out (a message is an interface too)."""
    cases = [
        (lambda: Schedule.from_config("x"),
         "a schedule config must be a dict with a 'kind' (named, betas, sigmas, ve, respaced), got 'x'"),
        (lambda: Schedule.from_config({"kind": "nope"}),
         "unknown schedule kind 'nope'; allowed: named, betas, sigmas, ve, respaced"),
        (lambda: Schedule.from_config({"kind": "named"}),
         "schedule config of kind 'named': missing ['name'], unknown []; it takes name and optionally T, "
         "zero_terminal_snr, s, max_beta, beta_start, beta_end, start, end, beta_min, beta_max"),
        (lambda: Schedule.from_config({"kind": "respaced", "base": 1}),
         "schedule config of kind 'respaced': missing ['timesteps'], unknown []; it takes base, timesteps"),
        (lambda: Schedule.from_sigmas([1.0, 0.5]), "VE sigmas must be finite, positive and strictly increasing"),
        (lambda: Schedule.make("linear", T=10, zero_terminal_snr=1), "zero_terminal_snr must be true or false, got 1"),
        (lambda: Schedule.make("linear", T=10, s=0.1),
         "schedule 'linear' takes no option(s) ['s']; it takes beta_start, beta_end"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value) == message
    for sigmas in ([], [0.0, 1.0], [1.0, 1.0], [1.0, float("inf")]):
        with pytest.raises(ValueError, match="finite, positive and strictly increasing"):
            Schedule.from_sigmas(sigmas)
    for ts in ([], [-1, 3], [3, 20]):
        with pytest.raises(ValueError, match=r"non-empty indices in \[0, 19\]"):
            Schedule.make("linear", T=20).respace(ts)


def test_broadcast_keeps_a_python_float_in_the_data_precision():
    """A coefficient given as a python float must not pass through float32 on its way to
    float64 data (it did once: DDIM's fused step lost 8 digits in float64)."""
    like = torch.zeros(3, 2, dtype=torch.float64)
    assert broadcast(0.1, like).item() == 0.1
    assert broadcast(torch.tensor([0.1, 0.2], dtype=torch.float64), like).shape == (2, 1)


def test_a_shared_level_is_looked_up_once_and_equals_the_per_example_lookup():
    s = Schedule.make("cosine", T=1000)
    for t in (torch.tensor(421), torch.tensor(421.25, dtype=torch.float64)):
        shared, copied = s.alpha_bar_at(t.expand(4)), s.alpha_bar_at(t.repeat(4))
        assert is_shared(shared) and not is_shared(copied)
        assert torch.equal(shared, copied)
