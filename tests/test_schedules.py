import math
import re

import pytest
import torch

from difflab.schedules import (
    Schedule,
    betas_from_alpha_bar,
    cosine_alpha_bar,
    geometric_sigmas,
    karras_sigmas,
    rescale_zero_terminal_snr,
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
