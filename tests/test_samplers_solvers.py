"""The newer solvers: Euler ancestral, DPM-Solver++(2M) SDE and UniPC. Each is held to its
exact reductions (to DDIM, Euler, DPM-Solver++(2M)), to the mixture at a moderate NFE, and
where it has one to its order of convergence; each check has a near miss it must reject.

Tolerances: distributions by the mixture check of test_samplers_support (N = 8000, every
z-score below 4.5, measured 2-3 at these step counts); equivalences 1e-12 in float64 (the
same arithmetic in VP and VE coordinates); orders of convergence within 0.3 of the order."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import difflab.samplers.ancestral as ancestral
import difflab.samplers.ode as ode
from difflab.denoiser import MixtureDenoiser
from difflab.mixture import GaussianMixture
from difflab.samplers import (
    ddim,
    dpmpp_2m,
    dpmpp_2m_sde,
    euler,
    euler_ancestral,
    get_timesteps,
    sample,
    sampling_plan,
    unipc,
)
from difflab.schedules import Schedule
from test_samplers_support import Z_LIMIT, assert_matches_mixture, distribution_z_scores, mixture_denoiser

unipc_module = importlib.import_module("difflab.samplers.unipc")  # the package's `unipc` is the function
N = 8000
ENOUGH = {"euler_a": 500, "dpmpp_2m_sde": 100, "unipc": 50}  # on T = 1000 (euler_a is ancestral DDPM)
EXACT = dict(rtol=0, atol=1e-12)


def draw(name, steps, seed=1, **options):
    return sample(mixture_denoiser(1000), (N, 2), name, steps=steps, generator=torch.Generator().manual_seed(seed),
                  progress=False, dtype=torch.float64, **options)  # fmt: skip


def x_T(batch=64, seed=0):
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gen(seed=5):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the mixture, and near misses
@pytest.mark.parametrize("name", list(ENOUGH))
def test_new_solver_draws_from_the_mixture(name):
    assert_matches_mixture(draw(name, ENOUGH[name]))


def test_euler_ancestral_with_too_much_noise_is_rejected(monkeypatch):
    """Near miss: sigma_up 15% too large (the marginal std drifts above sigma_next each step)."""
    right = ancestral.ancestral_split

    def wrong(sigma, sigma_next, eta):
        down, up = right(sigma, sigma_next, eta)
        return down, 1.15 * up

    monkeypatch.setattr(ancestral, "ancestral_split", wrong)
    assert max(distribution_z_scores(draw("euler_a", ENOUGH["euler_a"])).values()) > Z_LIMIT


def test_dpmpp_2m_sde_with_the_ode_noise_scale_is_rejected(monkeypatch):
    """Near miss: noise std sigma_next sqrt(1 - e^-h) instead of sqrt(1 - e^-2h)."""
    monkeypatch.setattr(ode, "sde_noise_std", lambda s_next, h, eta: s_next * math.sqrt(-math.expm1(-eta * h)))
    assert max(distribution_z_scores(draw("dpmpp_2m_sde", ENOUGH["dpmpp_2m_sde"])).values()) > Z_LIMIT


# ---------------------------------------------------------------- exact reductions
def test_euler_ancestral_reduces_to_euler_and_to_ddim_with_the_same_eta():
    """sigma_up is DDIM's s in VE coordinates: for any eta the step is DDIM's (Song et al. 2021,
    eq. 16), step for step with the same noise; eta = 0 is the Euler step."""
    den = mixture_denoiser(1000)
    ts = get_timesteps(den.schedule, 12, "trailing")
    torch.testing.assert_close(euler_ancestral(den, x_T(), ts, eta=0.0, progress=False),
                               euler(den, x_T(), ts, progress=False), **EXACT)  # fmt: skip
    for eta in (0.5, 1.0):
        a = euler_ancestral(den, x_T(), ts, eta=eta, generator=gen(), progress=False)
        b = ddim(den, x_T(), ts, eta=eta, generator=gen(), progress=False)
        torch.testing.assert_close(a, b, **EXACT)
    assert not torch.allclose(a, euler(den, x_T(), ts, progress=False))


def test_dpmpp_2m_sde_reduces_to_dpmpp_2m_and_its_first_order_step_to_ddpm():
    """eta = 0 is DPM-Solver++(2M) and draws no noise; one first-order step (two listed levels:
    one SDE step, then x0_hat) is DDIM with eta = 1, the DDPM posterior, with the same noise."""
    den = mixture_denoiser(1000)
    ts = get_timesteps(den.schedule, 12, "trailing")
    g = gen()
    state = g.get_state()
    torch.testing.assert_close(dpmpp_2m_sde(den, x_T(), ts, eta=0.0, generator=g, progress=False),
                               dpmpp_2m(den, x_T(), ts, progress=False), **EXACT)  # fmt: skip
    assert torch.equal(g.get_state(), state)
    two = ts[[0, 6]]
    torch.testing.assert_close(dpmpp_2m_sde(den, x_T(), two, generator=gen(), progress=False),
                               ddim(den, x_T(), two, eta=1.0, generator=gen(), progress=False), **EXACT)  # fmt: skip


def test_unipc_without_corrector_is_ddim_and_dpmpp_2m():
    """UniP-1 is DDIM; UniP-2 (rho = 1/2) is DPM-Solver++(2M); the corrector changes the result."""
    den = mixture_denoiser(1000)
    ts = get_timesteps(den.schedule, 12, "trailing")
    torch.testing.assert_close(unipc(den, x_T(), ts, order=1, corrector=False, progress=False),
                               ddim(den, x_T(), ts, progress=False), **EXACT)  # fmt: skip
    plain = dpmpp_2m(den, x_T(), ts, progress=False)
    torch.testing.assert_close(unipc(den, x_T(), ts, order=2, corrector=False, progress=False), plain, **EXACT)
    assert (unipc(den, x_T(), ts, progress=False) - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- orders of convergence
STD = 0.5
COSINE = Schedule.make("cosine", T=1000)
GAUSSIAN = MixtureDenoiser(GaussianMixture.isotropic(torch.ones(1), torch.zeros(1, 2), std=STD), COSINE)
T_HIGH, T_LOW = 900.0, 100.0


def flow_error(fn, n: int, **options) -> float:
    """Max error of the state at the last listed level (reported after step n - 2) against the
    exact probability-flow map of N(0, STD^2 I): in VE coordinates x(sigma) = x(sigma0)
    sqrt(STD^2 + sigma^2) / sqrt(STD^2 + sigma0^2). Levels uniform in log-SNR."""
    log_snr = torch.linspace(COSINE.log_snr_at(torch.tensor(T_HIGH)).item(),
                             COSINE.log_snr_at(torch.tensor(T_LOW)).item(), n, dtype=torch.float64)  # fmt: skip
    ts = COSINE.sigma_to_t(torch.exp(-log_snr / 2))
    ts[0], ts[-1] = T_HIGH, T_LOW
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seen = {}
    fn(GAUSSIAN, x, ts, progress=False, callback=lambda i, t, y, p: seen.__setitem__(i, y), **options)
    a, a_low = COSINE.alpha_bar_at(torch.tensor(T_HIGH)), COSINE.alpha_bar_at(torch.tensor(T_LOW))
    s, s_low = ((1 - a) / a).sqrt(), ((1 - a_low) / a_low).sqrt()
    exact = x / a.sqrt() * ((STD**2 + s_low**2) / (STD**2 + s**2)).sqrt() * a_low.sqrt()
    return (seen[n - 2] - exact).abs().max().item()


def observed_order(fn, **options) -> float:
    """log2 of the error ratio between 41 and 81 levels (both in the asymptotic range)."""
    return math.log2(flow_error(fn, 41, **options) / flow_error(fn, 81, **options))


@pytest.mark.parametrize(
    "fn,options,order",
    [(ddim, {}, 1), (dpmpp_2m, {}, 2), (unipc, {"order": 1}, 2), (unipc, {"order": 2}, 3),
     (unipc, {"order": 2, "corrector": False}, 2)],
    ids=["ddim", "dpmpp_2m", "unipc-1", "unipc-2", "unip-2"],
)  # fmt: skip
def test_order_of_convergence(fn, options, order):
    """UniC-p raises UniP-p's order by one at no extra NFE (Zhao et al. 2023)."""
    assert abs(observed_order(fn, **options) - order) < 0.3


def test_a_wrong_corrector_weight_loses_the_order(monkeypatch):
    """Near miss: UniC-2 with rho = (1/2, 1/2) (UniC-1's weight for both differences) instead of
    the solution of its order conditions: the order falls back to two."""
    right = unipc_module.unipc_rhos

    def wrong(rks, h, corrector):
        return [0.5] * len(rks) if corrector and len(rks) == 2 else right(rks, h, corrector)

    monkeypatch.setattr(unipc_module, "unipc_rhos", wrong)
    assert observed_order(unipc, order=2) < 2.5


# ---------------------------------------------------------------- options and eta
def test_eta_reaches_the_stochastic_samplers_and_only_them():
    den = mixture_denoiser(100)
    kw = dict(steps=8, progress=False, x_T=x_T(8), dtype=torch.float64)
    assert sampling_plan(den.schedule, "euler_a", 8)[2] == {}  # None: the sampler's own eta (1)
    a = sample(den, (8, 2), "euler_a", generator=gen(1), **kw)
    b = sample(den, (8, 2), "euler_a", generator=gen(2), **kw)
    assert not torch.allclose(a, b)  # stochastic by default
    same = dict(kw, spacing="trailing")  # the pairs' default spacings differ; the reduction is per ladder
    torch.testing.assert_close(sample(den, (8, 2), "euler_a", eta=0.0, **same), sample(den, (8, 2), "euler", **same))
    torch.testing.assert_close(sample(den, (8, 2), "dpmpp_2m_sde", eta=0, **same),
                               sample(den, (8, 2), "dpmpp_2m", **same))  # fmt: skip
    sample(den, (8, 2), "euler", eta=0.0, **kw)  # a zero eta is no option
    with pytest.raises(ValueError, match="eta applies only to sampler 'ddim' and the stochastic samplers euler_a"):
        sample(den, (8, 2), "unipc", eta=0.5, **kw)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sample(den, (8, 2), "dpmpp_2m_sde", eta=-1.0, **kw)


def test_unipc_validates_its_options():
    den = mixture_denoiser(100)
    for bad in (0, 4, 2.0, True):
        with pytest.raises(ValueError, match=r"order must be an integer in \[1, 3\]"):
            sample(den, (2, 2), "unipc", steps=5, progress=False, order=bad)
    with pytest.raises(ValueError, match="corrector must be True or False"):
        sample(den, (2, 2), "unipc", steps=5, progress=False, corrector=1)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde", "unipc"])
def test_output_is_the_last_prediction_of_x0(name):
    last = {}
    out = sample(mixture_denoiser(100), (16, 2), name, steps=10, progress=False, generator=gen(0),
                 callback=lambda i, t, x, p: last.update(x0=p.x0))  # fmt: skip
    assert torch.equal(out, last["x0"])
