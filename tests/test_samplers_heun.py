"""Heun at low NFE on VP schedules (issue 19): the default spacing and the stiff-step guard.

Karras et al.'s trapezoid in sigma multiplies the change of x0_hat across a step by
(rho - 1) / 2, rho = sigma / sigma_next. With Karras's ladder on a T = 1000 VP schedule the
last Heun steps drop into sigma_min ~ 0.01 (rho ~ 50-600 at 5-9 NFE) and cosine's first step
leaves sigma_max ~ 2e4: Heun collapsed (27x the noise floor at 9 NFE on the benchmark's 2-D
mixture, diffusers' Heun 6.8x). Now: uniform-in-t spacing by default, and steps with rho > 50
take the exponential-integrator weight. The old behaviour stays reachable (spacing="karras",
stiff_ratio=math.inf) and is the negative control.

Distance: the largest z-score of the mixture check (test_samplers_support; exact samples
stay below 4.5). Tolerance: below 60 at 9 NFE (measured: 26 linear, 21 cosine); the old
behaviour measures 449 (linear) and 18890 (cosine)."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.denoiser import MixtureDenoiser
from difflab.samplers import DEFAULT_SPACING, get_timesteps, heun, sample
from difflab.samplers.ode import STIFF_RATIO, heun_weight
from difflab.samplers.steps import heun_step
from difflab.schedules import Schedule
from test_samplers_support import MIXTURE, distribution_z_scores

N = 8000
LOW_NFE_STEPS = 5  # 9 NFE
LOW_NFE_LIMIT = 60.0
OLD = {"spacing": "karras", "stiff_ratio": math.inf}
SCHEDULES = {name: Schedule.make(name, T=1000) for name in ("linear", "cosine")}


def max_z(schedule: str, steps: int, **options) -> float:
    den = MixtureDenoiser(MIXTURE, SCHEDULES[schedule])
    x = sample(den, (N, 2), "heun", steps=steps, generator=torch.Generator().manual_seed(1), progress=False,
               dtype=torch.float64, **options)  # fmt: skip
    assert torch.isfinite(x).all()
    return max(distribution_z_scores(x).values())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_heun_at_9_nfe_stays_close_to_the_mixture(schedule):
    assert DEFAULT_SPACING["heun"] == "linspace"
    assert max_z(schedule, LOW_NFE_STEPS) < LOW_NFE_LIMIT


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_old_heun_fails_the_same_bound(schedule):
    """Negative control: Karras spacing with the plain trapezoid on every step (what `heun`
    did before) is rejected by the bound above, by a wide margin."""
    assert max_z(schedule, LOW_NFE_STEPS, **OLD) > 5 * LOW_NFE_LIMIT


def test_each_half_of_the_fix_is_needed():
    """On the linear schedule neither the guard with Karras spacing (449: its last step, rho = 49,
    is below the ratio) nor uniform spacing without the guard (149: its last step has rho = 96)
    meets the bound; on cosine, the guard alone takes Karras spacing from 18890 to 292."""
    assert max_z("linear", LOW_NFE_STEPS, spacing="karras") > LOW_NFE_LIMIT
    assert max_z("linear", LOW_NFE_STEPS, stiff_ratio=math.inf) > LOW_NFE_LIMIT
    assert max_z("cosine", LOW_NFE_STEPS, spacing="karras") < max_z("cosine", LOW_NFE_STEPS, **OLD) / 20


def test_heun_weight_is_the_trapezoid_below_the_stiff_ratio_and_bounded_above():
    for rho in (1.01, 2.0, 10.0, STIFF_RATIO):
        assert heun_weight(rho) == pytest.approx((rho - 1) / 2, rel=1e-15)
    for rho in (STIFF_RATIO * 1.01, 1e3, 1e8):
        assert 0.5 < heun_weight(rho) < 1.0
    # the exponential-integrator weight is d / 2 - 5 d^2 / 12 at rho = 1 + d: the same to leading
    # order, so (times the O(d) change of x0_hat) the step stays second order
    for d in (1e-2, 1e-3):
        exp_weight = heun_weight(1 + d, stiff_ratio=1.0 + 1e-12)
        assert exp_weight - d / 2 == pytest.approx(-5 * d**2 / 12, rel=0.05)
    assert heun_weight(1e3, stiff_ratio=math.inf) == pytest.approx(499.5)


def test_non_stiff_heun_steps_are_the_shared_heun_step():
    """Below the stiff ratio, each sampler step is `steps.heun_step` (the trapezoid in sigma that
    consistency distillation's teacher also takes)."""
    den = MixtureDenoiser(MIXTURE, SCHEDULES["linear"])
    ts = get_timesteps(den.schedule, 12, "linspace")
    sig = den.schedule.sigma_at(ts)
    rho = (sig[:-2] / sig[1:-1]).max().item()
    assert rho < STIFF_RATIO  # every Heun step of this ladder but the last is below the ratio
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = {}
    heun(den, x_T, ts, progress=False, callback=lambda i, t, x, p: seen.setdefault(i, x))
    x = x_T
    for i in range(len(ts) - 2):
        x, _ = heun_step(den, x, ts[i].expand(16), ts[i + 1].expand(16))
        torch.testing.assert_close(x, seen[i], rtol=0, atol=1e-10)


def test_stiff_ratio_is_validated():
    den = MixtureDenoiser(MIXTURE, SCHEDULES["linear"])
    for bad in (1.0, 0.5, -3, "50", True):
        with pytest.raises(ValueError, match="stiff_ratio must be a number > 1"):
            sample(den, (2, 2), "heun", steps=3, progress=False, stiff_ratio=bad)
