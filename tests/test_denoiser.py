"""Denoisers: the exact mixture oracle against closed forms and Monte Carlo, wrappers, and
static / dynamic thresholding with exact expectations."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.denoiser import (
    ClipDenoiser,
    DenoiserWrapper,
    DynamicThresholdDenoiser,
    MixtureDenoiser,
)
from difflab.mixture import GaussianMixture
from difflab.samplers import SAMPLERS, sample
from difflab.schedules import Schedule
from test_samplers_support import (
    MIXTURE,
    SCHEDULES,
    ConstantDenoiser,
    mixture_denoiser,
)

S100 = SCHEDULES[100]


# ---------------------------------------------------------------- the mixture oracle
def test_mixture_denoiser_matches_the_1d_gaussian_closed_form():
    """x0 ~ N(m, s^2): E[x0 | x_t] = m + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) m)."""
    m, s = 0.7, 0.4
    f64 = dict(dtype=torch.float64)
    den = MixtureDenoiser(
        GaussianMixture(torch.ones(1), torch.tensor([[m]], **f64), torch.tensor([[[s**2]]], **f64)), S100
    )
    x_t = torch.linspace(-3, 3, 13, dtype=torch.float64).view(-1, 1)
    for t in (0, 10, 50, 99, 37.25):
        a = S100.alpha_bar_at(torch.tensor(t)).item()
        want = m + math.sqrt(a) * s**2 / (a * s**2 + 1 - a) * (x_t - math.sqrt(a) * m)
        pred = den(x_t, torch.tensor(t))
        torch.testing.assert_close(pred.x0, want, rtol=1e-12, atol=1e-12)
        # the prediction is consistent: x_t = sqrt(a) x0 + sqrt(1 - a) eps
        torch.testing.assert_close(math.sqrt(a) * pred.x0 + math.sqrt(1 - a) * pred.eps, x_t, rtol=0, atol=1e-12)


def test_mixture_denoiser_matches_the_1d_two_component_closed_form():
    f64 = dict(dtype=torch.float64)
    w, m, s = torch.tensor([0.3, 0.7], **f64), torch.tensor([-1.0, 2.0], **f64), torch.tensor([0.2, 0.5], **f64)
    den = MixtureDenoiser(GaussianMixture(w, m.view(2, 1), (s**2).view(2, 1, 1)), S100)
    x_t = torch.linspace(-2, 3, 11, dtype=torch.float64)
    a = S100.alpha_bar_at(torch.tensor(30)).item()
    var = a * s**2 + 1 - a
    dens = w * torch.exp(-((x_t[:, None] - math.sqrt(a) * m) ** 2) / (2 * var)) / var.sqrt()
    resp = dens / dens.sum(1, keepdim=True)
    cond = m + math.sqrt(a) * s**2 / var * (x_t[:, None] - math.sqrt(a) * m)
    want = (resp * cond).sum(1, keepdim=True)
    torch.testing.assert_close(den(x_t.view(-1, 1), 30).x0, want, rtol=1e-12, atol=1e-12)


def test_mixture_denoiser_matches_a_monte_carlo_posterior_mean():
    """Self-normalised importance sampling with x0 ~ data: E[x0 | x_t] = sum_i w_i x0_i with
    w_i proportional to N(x_t; sqrt(a) x0_i, 1 - a). Tolerance: 5 Monte-Carlo standard errors."""
    g = torch.Generator().manual_seed(0)
    x0 = MIXTURE.sample(400_000, g)
    den = mixture_denoiser(100)
    for t in (20, 45, 70):
        a = S100.alpha_bar_at(torch.tensor(t)).item()
        x_t = math.sqrt(a) * MIXTURE.sample(4, g) + math.sqrt(1 - a) * torch.randn(
            4, 2, generator=g, dtype=torch.float64
        )
        exact = den(x_t, t).x0
        for j in range(4):
            logw = -((x_t[j] - math.sqrt(a) * x0) ** 2).sum(1) / (2 * (1 - a))
            wts = torch.softmax(logw, 0)
            est = wts @ x0
            se = ((wts[:, None] ** 2) * (x0 - est) ** 2).sum(0).sqrt()
            assert (1 / (wts**2).sum()) > 1000  # enough effective samples for the SE to mean something
            assert ((est - exact[j]).abs() < 5 * se + 1e-9).all(), (t, j, est, exact[j], se)


# ---------------------------------------------------------------- wrappers
def test_wrapper_forwards_attributes_and_predictions():
    den = mixture_denoiser(100)
    wrapped = DenoiserWrapper(den)
    assert wrapped.schedule is den.schedule and wrapped.prediction == den.prediction
    assert wrapped.variance == den.variance and wrapped.sample_shape == den.sample_shape
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(wrapped(x, 40).x0, den(x, 40).x0)
    with pytest.raises(ValueError, match=r"expected \(batch, 2\)"):
        wrapped.check_shape((3, 4))
    with pytest.raises(ValueError, match="needs a Denoiser to wrap"):
        DenoiserWrapper(lambda x, t: x)


def constant(x0, var_frac=None):
    return ConstantDenoiser(torch.as_tensor(x0, dtype=torch.float64), S100, var_frac=var_frac)


def test_static_clipping_is_exact_and_consistent():
    x0 = torch.tensor([[-3.0, -1.0, 0.5, 1.0, 2.0]], dtype=torch.float64)
    den = ClipDenoiser(constant(x0, var_frac=torch.full_like(x0, 0.25)))
    x_t = torch.randn(1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pred = den(x_t, 60)
    assert pred.x0.tolist() == [[-1.0, -1.0, 0.5, 1.0, 1.0]]
    a = S100.alpha_bar_at(torch.tensor(60)).item()
    torch.testing.assert_close(pred.eps, (x_t - math.sqrt(a) * pred.x0) / math.sqrt(1 - a), rtol=0, atol=1e-12)
    assert torch.equal(pred.var_frac, torch.full_like(x0, 0.25))
    assert ClipDenoiser(constant(x0), limit=2.5)(x_t, 60).x0.tolist() == [[-2.5, -1.0, 0.5, 1.0, 2.0]]


def test_dynamic_thresholding_is_exact_per_example():
    """Row 0: |x0| = 0.02 k (k = 0..200, signs alternating); the 0.995 quantile of 201 values
    is the 200th smallest exactly, s = 3.98, so x0 -> clip(x0, -3.98, 3.98) / 3.98.
    Row 1: 200 values of 0.5 and one 5.0: the quantile is 0.5 < 1, so s = 1 (plain clipping).
    Row 2: all inside [-1, 1]: unchanged."""
    k = torch.arange(201, dtype=torch.float64)
    row0 = 0.02 * k * (-1.0) ** k
    row1 = torch.cat([torch.full((200,), 0.5, dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64)])
    row2 = torch.linspace(-1, 1, 201, dtype=torch.float64)
    x0 = torch.stack([row0, row1, row2])
    out = DynamicThresholdDenoiser(constant(x0))(torch.zeros_like(x0), 50).x0
    torch.testing.assert_close(out[0], row0.clamp(-3.98, 3.98) / 3.98, rtol=0, atol=1e-12)
    assert out[0].abs().max() == 1.0 and out[0][-1] == 1.0
    torch.testing.assert_close(out[1], row1.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(out[2], row2, rtol=0, atol=0)
    # p = 1 uses the max: everything is rescaled into [-1, 1] without clipping
    full = DynamicThresholdDenoiser(constant(x0), percentile=1.0)(torch.zeros_like(x0), 50).x0
    torch.testing.assert_close(full[0], row0 / 4.0, rtol=0, atol=1e-12)


def test_thresholding_composes_and_keeps_eps_consistent():
    x0 = 3 * torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    den = ClipDenoiser(DynamicThresholdDenoiser(constant(x0)), limit=0.5)
    assert den.schedule is S100 and den.sample_shape == (6,)
    x_t = torch.randn(4, 6, dtype=torch.float64)
    pred = den(x_t, torch.tensor([10, 20, 30, 40]))
    assert pred.x0.abs().max() <= 0.5
    a = S100.alpha_bar_at(torch.tensor([10, 20, 30, 40])).view(-1, 1)
    torch.testing.assert_close(a.sqrt() * pred.x0 + (1 - a).sqrt() * pred.eps, x_t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("wrapper", [ClipDenoiser, DynamicThresholdDenoiser])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_respects_thresholding(wrapper, name):
    """Data partly outside [-1, 1]: thresholded samplers land inside it (the last step returns
    the thresholded x0), unthresholded ones do not."""
    mix = GaussianMixture.isotropic(torch.ones(2), torch.tensor([[-1.2, 0.0], [1.2, 0.5]]), std=0.3)
    den = MixtureDenoiser(mix, S100)
    kw = dict(steps=10, progress=False, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sample(wrapper(den), (64, 2), name, **kw).abs().max() <= 1.0
    assert sample(den, (64, 2), name, **kw).abs().max() > 1.0


def test_thresholding_validates_its_parameters():
    den = mixture_denoiser(100)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="limit must be a finite number > 0"):
            ClipDenoiser(den, limit=bad)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"percentile must lie in \(0, 1\]"):
            DynamicThresholdDenoiser(den, percentile=bad)


def test_float16_dynamic_thresholding():
    x0 = torch.tensor([[4.0, -2.0, 0.5]], dtype=torch.float16)
    schedule = Schedule.make("linear", T=10)
    den = DynamicThresholdDenoiser(ConstantDenoiser(x0, schedule), percentile=1.0)
    out = den(torch.zeros_like(x0), 3).x0
    assert out.dtype == torch.float16 and out.tolist() == [[1.0, -0.5, 0.125]]


def test_thresholded_picks_the_named_wrapper():
    from difflab.denoiser import ClipDenoiser, DynamicThresholdDenoiser, thresholded

    mixture = GaussianMixture.isotropic(torch.ones(1), torch.zeros(1, 2), 1.0)
    base = MixtureDenoiser(mixture, Schedule.make("linear", T=10))
    assert thresholded(base, "none") is base
    assert isinstance(thresholded(base, "static"), ClipDenoiser)
    assert isinstance(thresholded(base, "dynamic"), DynamicThresholdDenoiser)
    with pytest.raises(ValueError, match="allowed: none, static, dynamic"):
        thresholded(base, "clip")
