"""Single solver steps (samplers/steps.py): the same arithmetic as the samplers, per-example
levels, and the accuracy their names promise, checked on data with an exact denoiser."""

import math

import pytest
import torch

from difflab.denoiser import MixtureDenoiser
from difflab.mixture import GaussianMixture
from difflab.process import Prediction, q_sample
from difflab.samplers import ddim, heun
from difflab.samplers.steps import ddim_step, heun_step, renoise
from difflab.schedules import Schedule

SCHEDULE = Schedule.make("cosine", T=100)
MIXTURE = GaussianMixture.isotropic(
    torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64), std=0.4
)
DENOISER = MixtureDenoiser(MIXTURE, SCHEDULE)


def _x(batch=6, seed=0):
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_renoise_is_q_sample_at_the_same_level():
    x0, eps, t = _x(seed=1), _x(seed=2), torch.tensor([0, 10, 50, 99, 3, 70])
    expected = q_sample(SCHEDULE, x0, t, eps)
    assert torch.allclose(renoise(x0, SCHEDULE.alpha_bar_at(t), eps), expected, rtol=0, atol=1e-14)


def test_ddim_step_to_the_same_level_is_the_identity():
    # x_t = sqrt(a) x0 + sqrt(1 - a) eps for any consistent (x0, eps): stepping to a stays put
    x_t, t = _x(), torch.full((6,), 40)
    pred = DENOISER(x_t, t)
    a = SCHEDULE.alpha_bar_at(t)
    assert torch.allclose(ddim_step(pred, a), x_t, atol=1e-12)
    assert not torch.allclose(ddim_step(pred, SCHEDULE.alpha_bar_at(t - 10)), x_t, atol=1e-3)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_is_the_ddim_samplers_step(eta):
    x_T, ts = _x(), torch.tensor([80, 55, 20])
    seen = {}
    gen = torch.Generator().manual_seed(5)
    ddim(DENOISER, x_T, ts, eta=eta, generator=gen, progress=False, callback=lambda i, t, x, p: seen.setdefault(i, x))
    ab = SCHEDULE.alpha_bar_at(ts).tolist()
    noise = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(5), dtype=x_T.dtype)
    pred = DENOISER(x_T, ts[0])
    step = ddim_step(pred, ab[1], eta=eta, alpha_bar=ab[0], noise=noise if eta else None)
    assert torch.allclose(step, seen[0], rtol=0, atol=1e-12)


def test_ddim_step_takes_one_level_per_example():
    x_t, t, t_next = _x(), torch.tensor([90, 60, 30, 99, 5, 45]), torch.tensor([70, 20, 10, 50, 0, 44])
    pred = DENOISER(x_t, t)
    noise = _x(seed=9)
    a, a_next = SCHEDULE.alpha_bar_at(t), SCHEDULE.alpha_bar_at(t_next)
    batched = ddim_step(pred, a_next, eta=0.5, alpha_bar=a, noise=noise)
    for b in range(6):
        one = Prediction(pred.x0[b : b + 1], pred.eps[b : b + 1])
        alone = ddim_step(one, a_next[b].item(), eta=0.5, alpha_bar=a[b].item(), noise=noise[b : b + 1])
        assert torch.allclose(batched[b : b + 1], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_noise_scale_is_eta_times_the_posterior_std(eta):
    """s = eta sqrt(beta tilde) of the two-level chain a -> a' (Song et al. eq. 16), the std of
    q(x_a' | x_a, x0); written here from the respaced schedule's posterior variance, a separate
    code path. With x0 = eps = 0 and noise = 1 a step returns s itself; the eps coefficient then
    keeps the marginal variance: c_eps^2 + s^2 = 1 - a'. Both the float (sampler) and the
    tensor (per-example) paths. Near miss: s without its square root is off by > 5%."""
    ts = torch.tensor([80, 55, 20, 3])
    ab = SCHEDULE.alpha_bar_at(ts)
    zeros = Prediction(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    ones = torch.ones(1, 1, dtype=torch.float64)
    for a, a_next, i in zip(ab[:-1].tolist(), ab[1:].tolist(), range(3)):
        # posterior variance of the chain that jumps from ts[i] to ts[i + 1]: its step j = 1
        beta_tilde = SCHEDULE.respace(ts[i : i + 2]).posterior_variance[1].item()
        expected = eta * math.sqrt(beta_tilde)
        assert abs(eta * beta_tilde - expected) > 0.05 * expected  # the near miss is visible
        by_float = ddim_step(zeros, a_next, eta=eta, alpha_bar=a, noise=ones).item()
        level, level_next = torch.tensor([a], dtype=torch.float64), torch.tensor([a_next], dtype=torch.float64)
        by_tensor = ddim_step(zeros, level_next, eta=eta, alpha_bar=level, noise=ones).item()
        assert by_float == pytest.approx(expected, rel=1e-12) and by_tensor == pytest.approx(expected, rel=1e-12)
        eps_only = Prediction(torch.zeros(1, 1, dtype=torch.float64), ones)
        c_eps = ddim_step(eps_only, a_next, eta=eta, alpha_bar=a, noise=0 * ones).item()
        assert c_eps**2 + expected**2 == pytest.approx(1 - a_next, rel=1e-12)


def test_stochastic_ddim_step_needs_its_level_and_noise():
    pred = DENOISER(_x(), 30)
    with pytest.raises(ValueError, match="needs the current alpha_bar and the noise"):
        ddim_step(pred, 0.9, eta=1.0)


def test_heun_step_is_the_heun_samplers_step_and_ends_on_x0():
    x_T, ts = _x(), torch.tensor([90.0, 60.5, 20.0])
    seen = {}
    heun(DENOISER, x_T, ts, progress=False, callback=lambda i, t, x, p: seen.setdefault(i, (x, p)))
    step, pred = heun_step(DENOISER, x_T, ts[0].expand(6), ts[1].expand(6))
    assert torch.allclose(step, seen[0][0], rtol=0, atol=1e-10)
    assert torch.equal(pred.x0, seen[0][1].x0)
    x_last = seen[1][0]
    final, pred = heun_step(DENOISER, x_last, ts[2].expand(6), torch.full((6,), -1.0))
    assert torch.equal(final, pred.x0)  # the step to clean data is the Euler step onto x0_hat


def _gaussian_flow(x, t, t_next, std):
    """The exact probability-flow ODE map for N(0, std^2): in VE coordinates
    x_ve(sigma) = x_ve(sigma0) sqrt(std^2 + sigma^2) / sqrt(std^2 + sigma0^2)."""
    a, a_next = SCHEDULE.alpha_bar_at(t), SCHEDULE.alpha_bar_at(t_next)
    s, s_next = ((1 - a) / a).sqrt(), ((1 - a_next) / a_next).sqrt()
    x_ve = x / a.sqrt()[:, None]
    return (x_ve * ((std**2 + s_next**2) / (std**2 + s**2)).sqrt()[:, None]) * a_next.sqrt()[:, None]


def test_heun_step_is_second_order_and_euler_first_order_on_a_gaussian():
    std = 0.5
    gaussian = MixtureDenoiser(GaussianMixture.isotropic(torch.ones(1), torch.zeros(1, 2), std=std), SCHEDULE)
    x, t = _x(batch=4, seed=3), torch.full((4,), 60.0)
    errors = {"heun": [], "euler": []}
    for h in (8.0, 4.0, 2.0):
        t_next = t - h
        exact = _gaussian_flow(x, t, t_next, std)
        x_heun, pred = heun_step(gaussian, x, t, t_next)
        x_euler = ddim_step(pred, SCHEDULE.alpha_bar_at(t_next))
        errors["heun"].append((x_heun - exact).abs().max().item())
        errors["euler"].append((x_euler - exact).abs().max().item())
    # local error ~ h^3 for Heun (ratio 8 per halving), ~ h^2 for Euler (ratio 4)
    heun_order = math.log2(errors["heun"][1] / errors["heun"][2])
    euler_order = math.log2(errors["euler"][1] / errors["euler"][2])
    assert 2.5 < heun_order < 3.5, errors
    assert 1.5 < euler_order < 2.5, errors
    assert errors["heun"][-1] < errors["euler"][-1] / 10
