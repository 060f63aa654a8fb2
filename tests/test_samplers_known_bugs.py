"""One test per mistake other sampler implementations have shipped (issue numbers in the names'
docstrings). Most use data concentrated at one point c, whose exact denoiser makes every
deterministic sampler exact: eps stays equal to the initial noise at every step, and every
sampler must return c exactly."""

from __future__ import annotations

import pytest
import torch

from difflab.denoiser import DenoiserWrapper
from difflab.samplers import SAMPLERS, ddim, ddpm, get_timesteps, sample
from difflab.samplers.ddpm import AncestralStep
from difflab.samplers.loop import SamplerLoop
from test_samplers_support import (
    SCHEDULES,
    PointDenoiser,
    mixture_denoiser,
)

C = torch.tensor([0.7, -1.3], dtype=torch.float64)
S1000 = SCHEDULES[1000]


def point(record=False, schedule=S1000):
    return PointDenoiser(C, schedule, record=record)


def x_T(batch=5, seed=0):
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "name,spacing",
    [
        ("ddim", "trailing"),
        ("ddim", "linspace"),
        ("ddim", "karras"),
        ("euler", "trailing"),
        ("heun", "karras"),
        ("dpmpp_2m", "karras"),
    ],
)
def test_previous_timestep_is_read_from_the_list(name, spacing):
    """diffusers #9261, #11347: prev_t = t - T // n is wrong for trailing/linspace spacing.
    With point data the exact flow keeps eps constant; a step that lands on any level other
    than the next listed one would change the eps the denoiser sees there."""
    den = point(record=True)
    ts = get_timesteps(S1000, 13, spacing)
    x = SAMPLERS[name](den, x_T(), ts, progress=False)
    t_seen = [t[0].item() for t, _ in den.calls]
    assert set(t_seen) == set(ts.tolist())
    eps0 = den.calls[0][1]
    for t, eps in den.calls:
        torch.testing.assert_close(eps, eps0, rtol=0, atol=1e-9, msg=f"off the listed level at t={t[0].item()}")
    torch.testing.assert_close(x, C.expand_as(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("spacing", ["trailing", "leading", "ddim25"])
def test_every_sampler_lands_on_x0_without_residual_noise(name, spacing):
    """diffusers #2585 / denoising-diffusion-pytorch #18, #81: the last step must go to
    alpha_bar_prev = 1 (not alpha_bar[0]) and add no noise, so point data comes back exactly,
    even for stochastic samplers and spacings whose last kept step is not t = 0."""
    den = point()
    steps = None if spacing == "ddim25" else 8
    x = sample(
        den,
        (5, 2),
        name,
        steps=steps,
        spacing=spacing,
        progress=False,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(0),
        **({"eta": 1.0} if name == "ddim" else {}),
    )
    torch.testing.assert_close(x, C.expand_as(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun", "dpmpp_2m", "pc"])
def test_output_is_the_last_prediction_of_x0(name):
    """Same bug on real data: the returned sample is exactly the last x0_hat."""
    den = mixture_denoiser(100)
    last = {}
    out = sample(
        den,
        (16, 2),
        name,
        steps=10,
        progress=False,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x, p: last.update(x0=p.x0),
        **({"eta": 1.0} if name == "ddim" else {}),
    )
    assert torch.equal(out, last["x0"])


def test_ddpm_last_step_posterior_is_x0():
    """denoising-diffusion-pytorch #81: at the last respaced step the posterior mean must be
    x0_hat (coefficients 1 and 0), for a last kept step t = 99 as much as for t = 0."""
    den = mixture_denoiser(1000)
    ts = get_timesteps(S1000, 10, "trailing")
    assert ts[-1] == 99
    step = AncestralStep(den, SamplerLoop(den, x_T(), ts, progress=False))
    assert step.c_x0[-1] == pytest.approx(1.0, abs=1e-12) and step.c_xt[-1] == 0.0


@pytest.mark.parametrize("kind", ["fixed_small", "fixed_large"])
def test_ddpm_uses_the_respaced_betas(kind):
    """improved-diffusion respacing: a step from t to the next kept t' has beta = 1 - ab_t / ab_t'
    (fixed_large) and beta tilde = beta (1 - ab_t') / (1 - ab_t) (fixed_small), not the
    original one-step beta_t."""
    den = mixture_denoiser(1000)
    ts = get_timesteps(S1000, 13, "trailing")
    step = AncestralStep(den, SamplerLoop(den, x_T(), ts, progress=False), kind)
    ab, ab_next = S1000.alpha_bar[ts[:-1]], S1000.alpha_bar[ts[1:]]
    beta = 1 - ab / ab_next
    want = beta if kind == "fixed_large" else beta * (1 - ab_next) / (1 - ab)
    torch.testing.assert_close(torch.tensor(step.std[:-1], dtype=torch.float64) ** 2, want, rtol=1e-10, atol=0)


class WithVarFrac(DenoiserWrapper):
    """A learned-variance denoiser: the mixture's x0 with a fixed interpolation fraction v."""

    def __init__(self, inner, v):
        super().__init__(inner)
        self.v = v

    @property
    def variance(self):
        return "learned"

    def predict(self, x_t, t, cond):
        pred = self.inner.predict(x_t, t, cond)
        pred.var_frac = torch.full_like(x_t, self.v)
        return pred


@pytest.mark.parametrize("v,fixed", [(0.0, "fixed_small"), (1.0, "fixed_large")])
def test_learned_variance_interpolates_the_respaced_bounds(v, fixed):
    """Learned variance exp(v log beta + (1 - v) log beta tilde) on a respaced chain: v = 0 and
    v = 1 reproduce the fixed-small and fixed-large samplers with the same noise."""
    den = mixture_denoiser(1000)
    ts = get_timesteps(S1000, 20, "trailing")
    a = ddpm(WithVarFrac(den, v), x_T(64), ts, generator=torch.Generator().manual_seed(1), progress=False)
    b = ddpm(den, x_T(64), ts, variance=fixed, generator=torch.Generator().manual_seed(1), progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="needs the network's variance output"):
        ddpm(den, x_T(), ts, variance="learned", progress=False)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_ode_solvers_never_evaluate_or_divide_at_sigma_zero(name):
    """k-diffusion #37, #43: the final step to sigma = 0 must be a plain step onto x0_hat, not
    a derivative (x - x0) / sigma evaluated at sigma = 0 (PointDenoiser raises at t < 0)."""
    den = point(record=True)
    ts = get_timesteps(S1000, 6, "karras")
    x = SAMPLERS[name](den, x_T(), ts, progress=False)
    assert torch.isfinite(x).all()
    assert min(t.min().item() for t, _ in den.calls) >= 0
    assert len(den.calls) == {"heun": 2 * 6 - 1}.get(name, 6)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_per_sample_generators_make_samples_independent_of_batch_size(name):
    """k-diffusion #25: with one generator per example, example 2 of a batch of 4 equals the
    same example drawn alone (same seed), for every sampler's initial and step noise."""
    den = mixture_denoiser(100)
    kw = dict(steps=10, progress=False, dtype=torch.float64)
    batch = sample(den, (4, 2), name, generator=[torch.Generator().manual_seed(s) for s in range(4)], **kw)
    alone = sample(den, (1, 2), name, generator=[torch.Generator().manual_seed(2)], **kw)
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=1e-10)
    assert not torch.allclose(batch[1:2], alone)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_hold_no_state_between_calls(name):
    """diffusers #8711: a run must not depend on the runs before it (step counts, spacings)."""
    den = mixture_denoiser(100)

    def run(steps):
        return sample(den, (4, 2), name, steps=steps, progress=False, generator=torch.Generator().manual_seed(3))

    first = run(10)
    run(7)
    run(25)
    assert torch.equal(run(10), first)


def test_first_step_is_at_the_noisiest_kept_timestep():
    """diffusers #2585 / #6068: x_T is placed at the first listed (noisiest kept) timestep, for
    leading spacing too, and every listed step is taken exactly once."""
    for spacing in ("leading", "trailing", "linspace", "10,5,3"):
        den = point(record=True)
        steps = None if "," in spacing else 9
        ts = get_timesteps(S1000, steps, spacing)
        ddim(den, x_T(), ts, progress=False)
        assert [t[0].item() for t, _ in den.calls] == ts.tolist()
