"""What every sampler owes its caller beyond the right distribution, each checked so that a
plausible slip fails (the survivors of a mutation run of samplers/, benchmarks/mutation.py):
the condition reaches the network, the callback sees each step in VP coordinates at the level
it names, progress is shown and erased, defaults are the documented ones, and bad arguments
are refused with a message that names them."""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch

from difflab.denoiser import Denoiser
from difflab.process import Prediction
from difflab.samplers import (
    DEFAULT_SPACING,
    SAMPLERS,
    SamplerLoop,
    ddim,
    ddim_invert,
    get_timesteps,
    randn,
    resolve_sampler,
    sample,
    sampling_plan,
    slerp,
)
from difflab.samplers.ancestral import ancestral_split
from difflab.samplers.ddim import check_eta
from difflab.samplers.ode import VELevels, check_stiff_ratio, multistep_coefficients, sde_noise_std
from difflab.samplers.steps import _sqrt, ddim_coefficients, ddim_step, heun_step
from difflab.samplers.timesteps import sigma_spaced, space_timesteps
from difflab.samplers.unipc import solve_small, step_coefficients
from difflab.schedules import Schedule
from test_messages_support import exact

SCHEDULE = Schedule.make("linear", T=100)
# the deterministic samplers, and the stochastic ones at eta = 0
DETERMINISTIC = {"ddim": {}, "euler": {}, "heun": {}, "dpmpp_2m": {}, "unipc": {}, "euler_a": {"eta": 0.0},
                 "dpmpp_2m_sde": {"eta": 0.0}}  # fmt: skip


class ConditionalPoint(Denoiser):
    """The exact denoiser of data concentrated at cond["c"] (one point per example): whatever
    a sampler does, its last step must land on that point, and a deterministic sampler's path
    is x_t = sqrt(ab_t) c + sqrt(1 - ab_t) eps_T exactly (eps is constant along the flow)."""

    prediction = "x0"
    sample_shape = (2,)

    def __init__(self, schedule: Schedule = SCHEDULE):
        self.schedule = schedule

    def predict(self, x_t, t, cond):
        ab = self.schedule.alpha_bar_at(t).to(x_t)
        return Prediction.from_x0(cond["c"].to(x_t).expand_as(x_t), x_t, ab)


class Recording(ConditionalPoint):
    """ConditionalPoint that keeps every input it is queried at."""

    def __init__(self, schedule: Schedule = SCHEDULE):
        super().__init__(schedule)
        self.inputs: list[torch.Tensor] = []

    def predict(self, x_t, t, cond):
        self.inputs.append(x_t.clone())
        return super().predict(x_t, t, cond)


def point_problem(n: int = 4):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3
    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return ConditionalPoint(), {"c": c}, x_T


def recorder():
    calls = []

    def callback(i, t, x, pred):
        calls.append((i, t, x.clone(), pred))

    return calls, callback


def steps_for(name: str) -> int:
    return 1 if name == "consistency" else 6


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_gives_cond_to_the_network_and_lands_on_its_point(name, capsys):
    den, cond, x_T = point_problem()
    ts = get_timesteps(SCHEDULE, steps_for(name), DEFAULT_SPACING[name])
    calls, callback = recorder()
    out = SAMPLERS[name](den, x_T.clone(), ts, cond=cond, callback=callback, generator=torch.Generator())
    torch.testing.assert_close(out, cond["c"], atol=1e-9, rtol=0)
    # one report per listed step, in order, each with the prediction made at its listed level
    assert [c[0] for c in calls] == list(range(len(ts)))
    assert [c[1] for c in calls] == pytest.approx(ts.tolist())
    for _, _, _, pred in calls:
        torch.testing.assert_close(pred.x0, cond["c"], atol=1e-9, rtol=0)
    torch.testing.assert_close(calls[-1][2], out)
    # progress is on by default, named after the sampler, and erased when done
    assert_progress_bar(capsys.readouterr().err, name)
    SAMPLERS[name](den, x_T.clone(), ts, cond=cond, generator=torch.Generator(), progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="a list of 4 torch.Generators"):  # checked even where unused
        SAMPLERS[name](den, x_T.clone(), ts, cond=cond, generator=[torch.Generator()] * 3, progress=False)


def assert_progress_bar(err: str, desc: str) -> None:
    """tqdm's bar, named `desc` ("desc:  40%|..."), left erased (leave=False) when done."""
    assert re.search(rf"(^|\r){re.escape(desc)}: ", err) and err.endswith("\r"), repr(err[-80:])


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_callbacks_report_the_exact_path_in_vp_coordinates(name):
    """After step i the state sits at the next listed level (data at the end): VP coordinates,
    whatever coordinates the sampler works in."""
    den, cond, x_T = point_problem()
    ts = get_timesteps(SCHEDULE, 6, DEFAULT_SPACING[name])
    calls, callback = recorder()
    SAMPLERS[name](den, x_T.clone(), ts, cond=cond, callback=callback, progress=False, **DETERMINISTIC[name])
    ab = SCHEDULE.alpha_bar_at(ts).tolist() + [1.0]
    eps_T = (x_T - math.sqrt(ab[0]) * cond["c"]) / math.sqrt(1 - ab[0])
    for i, _, x, _ in calls:
        expected = math.sqrt(ab[i + 1]) * cond["c"] + math.sqrt(1 - ab[i + 1]) * eps_T
        torch.testing.assert_close(x, expected, atol=1e-7, rtol=1e-7, msg=f"{name} step {i}")


def test_sample_defaults_are_ddim_with_50_trailing_steps_and_a_progress_bar(capsys):
    den, cond, _ = point_problem()
    calls, callback = recorder()
    out = sample(den, (4, 2), callback=callback, cond=cond, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.double(), cond["c"], atol=1e-5, rtol=0)
    assert [c[1] for c in calls] == get_timesteps(SCHEDULE, 50, "trailing").tolist()
    assert_progress_bar(capsys.readouterr().err, "ddim")
    # sampling_plan has the same defaults, and passes rho on to the Karras ladder
    name, ts, options = sampling_plan(SCHEDULE)
    assert name == "ddim" and options == {} and torch.equal(ts, get_timesteps(SCHEDULE, 50, "trailing"))
    assert torch.equal(sampling_plan(SCHEDULE, "euler", 8)[1], get_timesteps(SCHEDULE, 8, "trailing"))
    for rho in (3.0, 7.0):
        karras = get_timesteps(SCHEDULE, 8, "karras", rho=rho)
        torch.testing.assert_close(sampling_plan(SCHEDULE, "euler", 8, spacing="karras", rho=rho)[1], karras)
        calls.clear()
        sample(den, (4, 2), "euler", 8, spacing="karras", rho=rho, cond=cond, callback=callback, progress=False)
        assert [c[1] for c in calls] == pytest.approx(karras.tolist())
    assert not torch.equal(get_timesteps(SCHEDULE, 8, "karras", rho=3.0), get_timesteps(SCHEDULE, 8, "karras"))
    assert torch.equal(get_timesteps(SCHEDULE, 8, "karras"), get_timesteps(SCHEDULE, 8, "karras", rho=7.0))


def test_sample_draws_x_T_in_the_dtype_and_device_asked_for():
    den, cond, _ = point_problem()
    seen = []
    out = sample(den, (4, 2), "ddim", 2, dtype=torch.float64, cond=cond, progress=False,
                 callback=lambda i, t, x, p: seen.append(x.dtype))  # fmt: skip
    assert out.dtype == torch.float64 and seen == [torch.float64, torch.float64]
    # a CPU generator still gives noise on the requested device
    assert randn((2, 3), torch.Generator(), device="meta").device.type == "meta"
    assert randn((2, 3), [torch.Generator(), torch.Generator()], device="meta").device.type == "meta"
    assert randn((2, 3), [torch.Generator()] * 2, dtype=torch.float64).dtype == torch.float64


def test_alias_spacing_rules():
    assert resolve_sampler("ddim") == ("ddim", None)
    assert resolve_sampler("ddim", "trailing") == ("ddim", "trailing")
    assert resolve_sampler("euler_karras") == ("euler", "karras")
    assert resolve_sampler("euler_karras", "karras") == ("euler", "karras")  # the same spacing: fine
    assert resolve_sampler("dpm++_2m") == ("dpmpp_2m", None)
    assert resolve_sampler("dpm++_2m", "linspace") == ("dpmpp_2m", "linspace")  # no implied spacing
    with pytest.raises(ValueError, match="sampler 'euler_karras' means spacing 'karras', but spacing 'linspace'"):
        resolve_sampler("euler_karras", "linspace")


def test_bad_plans_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"sampler 'euler' takes no option\(s\) bogus, zzz; allowed: none$"):
        sampling_plan(SCHEDULE, "euler", 5, zzz=1, bogus=2)
    with pytest.raises(ValueError, match=r"takes no option\(s\) bogus; allowed: n_steps, step_size, denoise$"):
        sampling_plan(SCHEDULE, "langevin", 5, bogus=2)
    with pytest.raises(ValueError, match="stochastic samplers euler_a, dpmpp_2m_sde, got eta=0.5 with sampler 'euler'"):
        sampling_plan(SCHEDULE, "euler", 5, eta=0.5)
    assert sampling_plan(SCHEDULE, "euler", 5, eta=0.0)[2] == {}  # eta 0 is every sampler's own
    with pytest.raises(
        ValueError, match="steps=None is allowed only with a respacing string, not with spacing 'trailing'"
    ):
        sampling_plan(SCHEDULE, "euler", None)
    with pytest.raises(ValueError, match="steps=None is allowed only with a respacing string, not with spacing 3"):
        sampling_plan(SCHEDULE, "euler", None, spacing=3)
    assert len(sampling_plan(SCHEDULE, "ddim", None, spacing="ddim10")[1]) == 10


def test_timesteps_are_checked_with_messages_that_name_them():
    den, cond, x_T = point_problem()
    # a single step is a valid chain (consistency models, one-step DDIM)
    torch.testing.assert_close(ddim(den, x_T.clone(), [50], cond=cond, progress=False), cond["c"])
    with pytest.raises(ValueError, match=r"non-empty 1-D sequence, got shape \(0,\)"):
        ddim(den, x_T, [], cond=cond, progress=False)
    with pytest.raises(ValueError, match=r"non-empty 1-D sequence, got shape \(1, 2\)"):
        ddim(den, x_T, [[50, 10]], cond=cond, progress=False)
    for bad in ([50, 50, 10], [50.0, 50.5, 10.0]):  # repeated, or rising by less than one step
        with pytest.raises(ValueError, match="strictly descending"):
            ddim(den, x_T, bad, cond=cond, progress=False)
    with pytest.raises(ValueError, match=r"generator must be .* got tuple of length 3"):
        ddim(den, x_T, [50, 10], cond=cond, progress=False, generator=(torch.Generator(),) * 3)


def test_loop_shows_its_description_and_counts_nothing_it_does_not_need(capsys):
    den, cond, x_T = point_problem()
    loop = SamplerLoop(den, x_T, [50, 10], cond=cond)
    assert list(loop) == [0, 1]
    assert_progress_bar(capsys.readouterr().err, "sampling")
    torch.testing.assert_close(loop.denoise(x_T, 1).x0, cond["c"])  # the loop's cond reaches the network
    # fractional levels are kept in double precision, integer ones as integers
    assert SamplerLoop(den, x_T, torch.tensor([50.5, 20.25]), progress=False).timesteps.dtype == torch.float64
    assert (
        SamplerLoop(den, x_T, torch.tensor([50, 20], dtype=torch.int32), progress=False).timesteps.dtype == torch.int64
    )


def test_ddim_inversion_reports_each_step_upward_with_its_condition(capsys):
    den, cond, _ = point_problem()
    ts = get_timesteps(SCHEDULE, 5, "linspace")
    calls, callback = recorder()
    x_T = ddim_invert(den, cond["c"].clone(), ts, cond=cond, callback=callback)
    assert_progress_bar(capsys.readouterr().err, "ddim inversion")
    ddim_invert(den, cond["c"].clone(), ts, cond=cond, progress=False)
    assert capsys.readouterr().err == ""
    assert [c[0] for c in calls] == list(range(5))
    assert [c[1] for c in calls] == ts.flip(0).tolist()  # climbing from the cleanest level
    torch.testing.assert_close(calls[-1][2], x_T)
    for _, _, _, pred in calls:
        torch.testing.assert_close(pred.x0, cond["c"])


def test_ddim_inversion_refine_is_off_by_default_and_checked():
    den, cond, _ = point_problem()
    ts = get_timesteps(SCHEDULE, 5, "linspace")
    recording = Recording()
    ddim_invert(recording, cond["c"], ts, cond=cond, progress=False)
    assert len(recording.inputs) == 5  # one NFE per step: no fixed-point iterations unless asked
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"refine must be an integer >= 0 .*got {bad!r}"):
            ddim_invert(den, cond["c"], ts, cond=cond, progress=False, refine=bad)


def test_slerp_on_unequal_norms_and_in_any_direction():
    """Vectors of different lengths at a known angle: slerp follows the arc of
    sin((1 - a) theta) z0 + sin(a theta) z1 over sin(theta), theta the angle between them."""
    z0 = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    theta = torch.tensor([math.pi / 3, 2 * math.pi / 3], dtype=torch.float64)  # 60 and 120 degrees
    z1 = torch.stack(
        [5 * torch.stack([theta[0].cos(), theta[0].sin()]), 0.5 * torch.stack([-theta[1].sin(), theta[1].cos()])]
    )
    for alpha in (0.25, 0.7):
        w0 = torch.sin((1 - alpha) * theta) / torch.sin(theta)
        w1 = torch.sin(alpha * theta) / torch.sin(theta)
        torch.testing.assert_close(slerp(z0, z1, alpha), w0[:, None] * z0 + w1[:, None] * z1, atol=1e-14, rtol=1e-14)
    # opposite vectors (cos = -1 up to rounding) and one 1-D pair
    u = torch.tensor([0.6, 0.8], dtype=torch.float64)
    torch.testing.assert_close(slerp(u, -u, 0.0), u)
    torch.testing.assert_close(slerp(u, 2 * u, 0.25), 1.25 * u)  # parallel: lerp
    one = slerp(z0[1], z1[1], 0.7)
    assert one.shape == (2,) and one.dtype == torch.float64
    torch.testing.assert_close(one, slerp(z0, z1, 0.7)[1])
    # a per-example alpha, as a (B,) tensor or a one-element one
    both = slerp(z0, z1, torch.tensor([0.25, 0.7]))
    torch.testing.assert_close(both[0], slerp(z0, z1, 0.25)[0])
    torch.testing.assert_close(both[1], slerp(z0, z1, 0.7)[1])
    torch.testing.assert_close(slerp(z0, z1, torch.tensor([0.7])), slerp(z0, z1, 0.7))


def test_slerp_survives_a_cosine_rounded_past_one():
    """Float32 vectors whose cosine with a multiple of themselves rounds to 1 + 1e-7 (or -1 - 1e-7):
    without clamping, arccos gives NaN; with it they are parallel and slerp is lerp."""
    up = torch.tensor(
        [1.5409960746765137, -0.293428897857666, -2.1787893772125244, 0.5684312582015991, -1.0845223665237427]
    )
    down = torch.tensor(
        [-1.3985954523086548, 0.40334683656692505, 0.8380263447761536, -0.7192575931549072, -0.40334352850914]
    )

    def cos(a, b):  # as slerp computes it
        return (a[None] * b[None]).sum(1) / (a[None].norm(dim=1) * b[None].norm(dim=1))

    assert cos(up, 3 * up) > 1 and cos(down, -2 * down) < -1
    torch.testing.assert_close(slerp(up, 3 * up, 0.25), 1.5 * up)
    torch.testing.assert_close(slerp(down, -2 * down, 0.25), 0.25 * down)


def test_eta_must_be_a_finite_number_at_least_zero():

    assert check_eta(0) == 0.0 and isinstance(check_eta(1), float)
    for bad in (True, "1", -0.1, math.inf, math.nan):
        with pytest.raises(
            ValueError,
            match=re.escape(f"eta must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {bad!r}"),
        ):
            check_eta(bad)


def test_slerp_near_parallel_and_bad_alpha():
    z0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    tiny = torch.tensor([[1.0, 1e-7, 0.0]], dtype=torch.float64)  # sin(theta) = 1e-7 < 1e-6: lerp
    torch.testing.assert_close(slerp(z0, tiny, 0.5), 0.5 * (z0 + tiny))
    images = torch.zeros(3, 2, 2, 2)
    for bad in (torch.zeros(2), torch.zeros(3, 1), torch.zeros(1, 1)):
        with pytest.raises(
            ValueError, match=r"alpha must be a float or a \(3,\) tensor, got shape " + re.escape(str(tuple(bad.shape)))
        ):
            slerp(images, images + 1, bad)


def test_timestep_spacings_keep_their_types_counts_and_messages():

    # fractional ladders may hold more levels than the chain has steps; grid ladders may not
    for spacing in ("karras", "geometric"):
        ladder = get_timesteps(SCHEDULE, 1000, spacing)
        assert ladder.dtype == torch.float64 and len(ladder) == 1000 and (ladder.diff() < 0).all()
        assert ladder[1] > SCHEDULE.T - 2  # dense near the top: nothing clamped below T - 1
        assert get_timesteps(SCHEDULE, 1, spacing).dtype == torch.float64
    with pytest.raises(ValueError, match=r"in \[1, 100\] \(the schedule's T\), got 101"):
        get_timesteps(SCHEDULE, 101, "linspace")
    with pytest.raises(ValueError, match=r"\(a limit on sampler steps\), got 0"):
        get_timesteps(SCHEDULE, 0, "karras")
    with pytest.raises(ValueError, match="spacing must be a string, got 3"):
        get_timesteps(SCHEDULE, 5, 3)
    # rho: any positive value, 7 by default
    torch.testing.assert_close(sigma_spaced(SCHEDULE, 8, "karras"), get_timesteps(SCHEDULE, 8, "karras", rho=7.0))
    assert not torch.equal(sigma_spaced(SCHEDULE, 8, "karras"), sigma_spaced(SCHEDULE, 8, "karras", rho=8.0))
    assert (get_timesteps(SCHEDULE, 8, "karras", rho=0.5).diff() < 0).all()
    with pytest.raises(ValueError, match="rho must be > 0, got 0"):
        get_timesteps(SCHEDULE, 8, "karras", rho=0)
    # respacing: every step, a single step per section, and the messages
    assert space_timesteps(100, "ddim100") == list(range(100))
    assert space_timesteps(100, "50,50") == list(range(100))
    assert space_timesteps(100, "1,1") == [0, 50]
    with pytest.raises(ValueError, match="comma-separated integers, got '10,x'"):
        space_timesteps(100, "10,x")


def test_single_steps_check_their_inputs_and_spend_no_extra_evaluation():

    # mixed float / tensor levels take the tensor branch in double precision
    floats = ddim_coefficients(0.3, 0.6, 0.7)
    for a, a_next in (
        (0.3, torch.tensor([0.6, 0.6], dtype=torch.float64)),
        (torch.tensor([0.3, 0.3], dtype=torch.float64), 0.6),
    ):
        for got, want in zip(ddim_coefficients(a, a_next, 0.7), floats):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, torch.full_like(got, want), atol=1e-12, rtol=0)
    # at the clean level there is no noise to add (and nothing to divide by)
    assert ddim_coefficients(1.0, 1.0, 1.0) == (1.0, 0.0, 0.0)
    c = ddim_coefficients(torch.tensor([1.0, 0.3]), torch.tensor([1.0, 0.6]), 1.0)
    assert torch.isfinite(torch.stack(c)).all() and c[2][0] == 0.0 and c[2][1] > 0
    assert _sqrt(torch.tensor([0.3])).dtype == torch.float64
    den, cond, x = point_problem()
    pred = den(x, torch.full((4,), 50), cond)
    for given in ({"alpha_bar": 0.5}, {"noise": torch.zeros_like(x)}):
        with pytest.raises(
            ValueError, match=r"^a stochastic DDIM step \(eta > 0\) needs the current alpha_bar and the noise$"
        ):
            ddim_step(pred, 0.8, eta=1.0, **given)

    recording, t = Recording(), torch.full((4,), 50)
    out, _ = heun_step(recording, x, t, torch.full((4,), -1), cond)  # onto clean data: Euler, one NFE
    assert len(recording.inputs) == 1
    torch.testing.assert_close(out, cond["c"])
    recording.inputs.clear()
    t_next = torch.tensor([20, -1, 20, 10])
    out, _ = heun_step(recording, x, t, t_next, cond, pred=pred)  # the given prediction is reused
    assert len(recording.inputs) == 1
    ab, ab_next = SCHEDULE.alpha_bar_at(t), SCHEDULE.alpha_bar_at(t_next)
    eps_T = (x - ab.sqrt()[:, None] * cond["c"]) / (1 - ab).sqrt()[:, None]
    torch.testing.assert_close(out, ab_next.sqrt()[:, None] * cond["c"] + (1 - ab_next).sqrt()[:, None] * eps_T)


def test_ancestral_samplers_name_the_spacings_they_need():
    den, cond, x_T = point_problem()
    message = (
        "ancestral sampling needs integer timesteps (a sub-chain of the schedule); use spacing 'linspace', "
        "'trailing', 'leading' or a respacing string, not 'karras'/'geometric'"
    )
    with pytest.raises(ValueError, match=exact(message)):
        SAMPLERS["ddpm"](den, x_T, get_timesteps(SCHEDULE, 5, "karras"), cond=cond, progress=False)


def test_one_langevin_step_per_level_by_hand():
    """x_ve = x_T / sqrt(ab), one step per level x + (eps_step / 2) score + sqrt(eps_step) z with the
    VE score -(x - c) / sigma^2 and eps_step = step_size sigma^2, reported in VP coordinates; the
    final denoising evaluates the network at the last iterate, in VP coordinates."""
    recording, cond, x_T = Recording(), point_problem()[1], point_problem()[2]
    ts = torch.tensor([80, 40])
    calls, callback = recorder()
    x_start = x_T.clone()
    SAMPLERS["langevin"](recording, x_T, ts, generator=torch.Generator().manual_seed(3), cond=cond,
                         callback=callback, n_steps=1, step_size=0.3, progress=False)  # fmt: skip
    ab = SCHEDULE.alpha_bar_at(ts).tolist()
    g = torch.Generator().manual_seed(3)
    x = x_T / math.sqrt(ab[0])
    path = []
    for a in ab:
        sigma = math.sqrt((1 - a) / a)
        z = torch.randn(x_T.shape, generator=g, dtype=torch.float64)
        x = x - 0.5 * 0.3 * (x - cond["c"]) + math.sqrt(0.3) * sigma * z
        path.append(x)
    torch.testing.assert_close(calls[0][2], path[0] * math.sqrt(ab[0]))
    torch.testing.assert_close(recording.inputs[1], path[0] * math.sqrt(ab[1]))
    torch.testing.assert_close(recording.inputs[2], path[1] * math.sqrt(ab[1]))  # the final denoising
    torch.testing.assert_close(calls[1][2], cond["c"])
    assert torch.equal(x_T, x_start)  # x_T itself is left alone


def test_langevin_defaults_and_checks():
    den, cond, x_T = point_problem()
    ts = torch.tensor([80, 40])
    counting = Recording()
    annealed_langevin = SAMPLERS["langevin"]

    def run(**kw):
        return annealed_langevin(den, x_T, ts, generator=torch.Generator().manual_seed(5), cond=cond,
                                 denoise=False, progress=False, **kw)  # fmt: skip

    assert torch.equal(run(), run(n_steps=20, step_size=0.5))
    annealed_langevin(counting, x_T, ts, cond=cond, progress=False)
    assert len(counting.inputs) == 2 * 20 + 1  # n_steps per level and the final denoising
    for kw, message in (
        ({"step_size": 0}, "step_size must be a finite number > 0, got 0"),
        ({"step_size": math.inf}, "step_size must be a finite number > 0, got inf"),
        ({"n_steps": 2.5}, "n_steps must be an integer >= 1, got 2.5"),
        ({"n_steps": "3"}, "n_steps must be an integer >= 1, got '3'"),
    ):
        with pytest.raises(ValueError, match=exact(message)):
            run(**kw)
    zero_snr = Schedule.make("linear", T=100, zero_terminal_snr=True)
    with pytest.raises(
        ValueError, match=re.escape("needs a finite largest sigma (alpha_bar > 0 at the first timestep)")
    ):
        annealed_langevin(ConditionalPoint(zero_snr), x_T, torch.tensor([99, 40]), cond=cond, progress=False)


def test_one_corrector_step_by_hand_and_pc_defaults():
    """The corrector moves x_T by e * score + sqrt(2 e) z with e = 2 alpha snr^2 (1 - ab),
    alpha = ab / ab_next of the listed step; the predictor then sees exactly that point."""
    den, cond, x_T = point_problem()
    ts = torch.tensor([80, 40])
    pc = SAMPLERS["pc"]
    pc(den, x_T, ts, generator=torch.Generator().manual_seed(3), cond=cond, snr=0.2, progress=False)
    ab80, ab40 = SCHEDULE.alpha_bar_at(ts).tolist()
    e = 2 * (ab80 / ab40) * 0.2**2 * (1 - ab80)
    eps = (x_T - math.sqrt(ab80) * cond["c"]) / math.sqrt(1 - ab80)
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    recording = Recording()
    pc(recording, x_T, ts, generator=torch.Generator().manual_seed(3), cond=cond, snr=0.2, progress=False)
    assert len(recording.inputs) == 2 * (1 + 1)  # one corrector step per level by default
    torch.testing.assert_close(recording.inputs[1], x_T - e * eps / math.sqrt(1 - ab80) + math.sqrt(2 * e) * z)
    # the variance option reaches the predictor
    small, large = [], []
    for kind, calls in (("fixed_small", small), ("fixed_large", large)):
        pc(den, x_T, ts, generator=torch.Generator().manual_seed(3), cond=cond, variance=kind, progress=False,
           callback=lambda i, t, x, p, calls=calls: calls.append(x.clone()))  # fmt: skip
    assert not torch.allclose(small[0], large[0])
    with pytest.raises(ValueError, match=re.escape("n_corrector must be an integer >= 1, got 1.5")):
        pc(den, x_T, ts, cond=cond, n_corrector=1.5, progress=False)


def exponential_integral(lam_s: float, lam_t: float, degree: int) -> float:
    """int_{lam_s}^{lam_t} e^(lam - lam_t) (lam - lam_s)^degree dlam by 30-point Gauss-Legendre
    (exact to rounding for this smooth integrand)."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(30)
    half = (lam_t - lam_s) / 2
    lam = lam_s + half * (nodes + 1)
    return float(half * np.sum(weights * np.exp(lam - lam_t) * (lam - lam_s) ** degree))


@pytest.mark.parametrize(
    "history,corrector,degree",
    [([], False, 0), ([3], False, 1), ([3, 2], False, 2), ([], True, 1), ([3], True, 2), ([3, 2], True, 3)],
    ids=["P1", "P2", "P3", "C1", "C2", "C3"],
)  # fmt: skip
def test_unipc_steps_integrate_polynomial_x0_exactly(history, corrector, degree):
    """A UniPC step x_t = e^-h x_s + sum_k w_k x0(lambda_k) is exact when x0 is a polynomial in
    lambda of the degree its order conditions cover: UniP-p of degree p - 1 and UniC-p of degree p,
    except UniP-2 and UniC-1, which take the simplified rho = 1/2 (checked to miss instead)."""

    den, cond, x_T = point_problem()
    ts = torch.tensor([90.0, 71.0, 50.0, 33.0, 20.0, 9.0], dtype=torch.float64)  # uneven steps
    lv = VELevels(SamplerLoop(den, x_T, ts, cond=cond, progress=False))
    s = 4 if not history else history[0] + 1
    c_x, weights = step_coefficients(lv, s, history, corrector)
    h = lv.lam[s + 1] - lv.lam[s]
    assert c_x == pytest.approx(math.exp(-h), rel=1e-14)
    assert step_coefficients(lv, 5, [4, 3], corrector) == (0.0, {5: 1.0})  # onto sigma = 0: x0_hat itself
    simplified = (corrector and not history) or (not corrector and len(history) == 1)
    for d in range(degree + 1):
        got = sum(w * (lv.lam[k] - lv.lam[s]) ** d for k, w in weights.items())
        want = exponential_integral(lv.lam[s], lv.lam[s + 1], d)
        if simplified and d == degree:
            assert got != pytest.approx(want, rel=1e-6, abs=1e-9)
        else:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (d, got, want)


def test_zero_terminal_snr_is_refused_by_name_where_sigma_would_be_infinite():
    zero_snr = Schedule.make("linear", T=100, zero_terminal_snr=True)
    den, cond, x_T = ConditionalPoint(zero_snr), point_problem()[1], point_problem()[2]
    message = ("sigma-space solvers need alpha_bar > 0 at the first timestep (finite sigma); this schedule "
               "has zero terminal SNR: start below T-1 or use ddim/ddpm")  # fmt: skip
    with pytest.raises(ValueError, match=exact(message)):
        SAMPLERS["euler"](den, x_T, torch.tensor([99, 40]), cond=cond, progress=False)
    message = "annealed Langevin needs a finite largest sigma (alpha_bar > 0 at the first timestep)"
    with pytest.raises(ValueError, match=exact(message)):
        SAMPLERS["langevin"](den, x_T, torch.tensor([99, 40]), cond=cond, progress=False)
    message = (f"spacing 'karras' needs a finite largest sigma; this schedule ({zero_snr.name}) has zero terminal "
               "SNR: use 'linspace' or 'trailing' with ddim/ddpm")  # fmt: skip
    with pytest.raises(ValueError, match=exact(message)):
        get_timesteps(zero_snr, 5, "karras")


def test_consistency_renoises_every_step_but_the_first():
    """Multistep consistency sampling: x0_hat at the first level from x_T itself, then x0_hat
    taken back to each later level with fresh noise: sqrt(ab) x0_hat + sqrt(1 - ab) z."""
    recording, cond, x_T = Recording(), point_problem()[1], point_problem()[2]
    ts = torch.tensor([99, 60, 30])
    SAMPLERS["consistency"](recording, x_T, ts, cond=cond, generator=torch.Generator().manual_seed(2), progress=False)
    g = torch.Generator().manual_seed(2)
    z1, z2 = (torch.randn(x_T.shape, generator=g, dtype=torch.float64) for _ in range(2))
    ab = SCHEDULE.alpha_bar_at(ts).tolist()
    torch.testing.assert_close(recording.inputs[0], x_T)
    torch.testing.assert_close(recording.inputs[1], math.sqrt(ab[1]) * cond["c"] + math.sqrt(1 - ab[1]) * z1)
    torch.testing.assert_close(recording.inputs[2], math.sqrt(ab[2]) * cond["c"] + math.sqrt(1 - ab[2]) * z2)


def test_step_noise_formulas():

    # ancestral: sigma_up = eta sigma_next sqrt(1 - sigma_next^2 / sigma^2), down^2 + up^2 = sigma_next^2
    up = 0.5 * 1.0 * math.sqrt(1 - 1 / 4)
    assert ancestral_split(2.0, 1.0, 0.5) == pytest.approx((math.sqrt(1 - up**2), up), rel=1e-15)
    assert ancestral_split(2.0, 0.0, 1.0) == (0.0, 0.0)
    # DPM-Solver++ SDE: fresh noise sigma_next sqrt(1 - e^(-2 eta h)); none at eta = 0
    assert sde_noise_std(0.7, 0.3, 0.5) == pytest.approx(0.7 * math.sqrt(1 - math.exp(-0.3)), rel=1e-15)
    assert sde_noise_std(0.7, 0.3, 0.0) == 0.0
    assert check_stiff_ratio(1.5) == 1.5  # any ratio above one
    # the step onto sigma = 0 is x0_hat itself
    den, cond, x_T = point_problem()

    lv = VELevels(SamplerLoop(den, x_T, torch.tensor([80, 40]), cond=cond, progress=False))
    assert multistep_coefficients(lv, 2, 1.0)[-1] == (0.0, 1.0, 0.0, 0.0)


def test_unipc_plan_warms_up_and_lowers_its_order_at_the_end(monkeypatch):
    """Which earlier levels each step combines (Zhao et al.'s warm-up and lower_order_final): the
    predictor of step i uses the p_i - 1 nearest earlier levels, p_i = min(order, i + 1, n - i);
    the corrector of level i (1 <= i <= n - 2) redoes step i - 1 with the levels its predictor used."""
    unipc_module = importlib.import_module("difflab.samplers.unipc")  # the package exports the function
    plan = []
    real = unipc_module.step_coefficients

    def recording(lv, s, history, corrector):
        plan.append((s, list(history), corrector))
        return real(lv, s, history, corrector)

    monkeypatch.setattr(unipc_module, "step_coefficients", recording)
    den, cond, x_T = point_problem()
    ts = get_timesteps(SCHEDULE, 6, "trailing")
    for order, kw in ((3, {"order": 3}), (2, {})):  # order 2 is the default
        plan.clear()
        SAMPLERS["unipc"](den, x_T.clone(), ts, cond=cond, progress=False, **kw)
        n = len(ts)
        p = [min(order, i + 1, n - i) for i in range(n)]
        predict = [(i, list(range(i - 1, i - p[i], -1)), False) for i in range(n)]
        correct = [(i - 1, predict[i - 1][1], True) for i in range(1, n - 1)]
        assert plan == predict + correct
        assert p == ([1, 2, 3, 3, 2, 1] if order == 3 else [1, 2, 2, 2, 2, 1])
    assert unipc_module.check_order(3) == 3


def test_small_solver_pivots():

    R = [[1.0, 2.0, 1.0], [3.0, 1.0, 0.0], [0.0, 0.5, 3.0]]  # the largest pivot is not the last row's
    b = [1.0, 2.0, 3.0]
    want = torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert solve_small(R, b) == pytest.approx(want.tolist(), rel=1e-12)
    assert solve_small([[3.0, 1.0], [6.0, 1.0]], [5.0, 8.0]) == pytest.approx([1.0, 2.0], rel=1e-12)
