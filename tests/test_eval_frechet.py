"""Frechet distance: exact against closed forms, symmetric, zero on identical sets, clear errors."""

import math

import numpy as np
import pytest
import torch

from difflab.eval.frechet import feature_stats, frechet_distance, frechet_distance_from_stats


def features_with_stats(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples whose *sample* mean and (ddof=1) covariance equal mean and cov exactly.

    Whitening random draws and re-colouring them makes the fitted Gaussian exact, so FD of such
    sets must match the closed form to round-off, not just to sampling error.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    white = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(white, z.T, upper=False).T  # sample cov now I
    return z @ torch.linalg.cholesky(cov).T + mean


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_feature_stats_match_numpy():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mean, cov = feature_stats(x)
    assert mean.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), x.double().numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False), atol=1e-12)


def test_identical_sets_give_zero():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(1)) * 3 + 2
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x.numpy(), x.clone()) == pytest.approx(0.0, abs=1e-6)


def test_rank_deficient_identical_sets_give_zero():
    """Fewer samples than dims (singular covariance): the PSD square root must still give 0."""
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(2))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_diagonal_gaussians_closed_form():
    """Diagonal covariances: FD = |mu_a - mu_b|^2 + sum_i (sigma_a,i - sigma_b,i)^2."""
    mean_a, mean_b = f64([0.0, 1.0, -2.0]), f64([1.0, 1.0, 0.5])
    sd_a, sd_b = f64([1.0, 2.0, 0.5]), f64([3.0, 0.5, 0.5])
    expected = float((mean_a - mean_b).pow(2).sum() + (sd_a - sd_b).pow(2).sum())  # 1 + 6.25 + 4 + 2.25 = 13.5
    assert expected == pytest.approx(13.5)
    fa = features_with_stats(mean_a, torch.diag(sd_a**2), 200, seed=3)
    fb = features_with_stats(mean_b, torch.diag(sd_b**2), 150, seed=4)
    assert frechet_distance(fa, fb) == pytest.approx(expected, abs=1e-8)
    assert frechet_distance_from_stats(mean_a, torch.diag(sd_a**2), mean_b, torch.diag(sd_b**2)) == pytest.approx(
        expected, abs=1e-10
    )


def test_non_commuting_2x2_closed_form():
    """For 2x2 M = S_a S_b (positive eigenvalues): tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))."""
    cov_a, cov_b = f64([[2.0, 0.9], [0.9, 1.0]]), f64([[1.0, -0.6], [-0.6, 3.0]])
    assert not torch.allclose(cov_a @ cov_b, cov_b @ cov_a)  # really a non-commuting pair
    mean_a, mean_b = f64([0.5, -1.0]), f64([0.0, 0.0])
    m = cov_a @ cov_b
    trace_sqrt = math.sqrt(float(torch.trace(m)) + 2 * math.sqrt(float(torch.linalg.det(m))))
    expected = 0.25 + 1.0 + 3.0 + 4.0 - 2 * trace_sqrt
    fa = features_with_stats(mean_a, cov_a, 100, seed=5)
    fb = features_with_stats(mean_b, cov_b, 100, seed=6)
    assert frechet_distance(fa, fb) == pytest.approx(expected, abs=1e-8)


def test_non_commuting_high_dim_against_eigvals_reference():
    """Reference: tr sqrt(S_a S_b) = sum sqrt(eig(S_a S_b)), from numpy's general (non-symmetric) eig."""
    d = 8
    cov_a, cov_b = random_spd(d, 7), random_spd(d, 8)
    g = torch.Generator().manual_seed(9)
    mean_a, mean_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    eig = np.linalg.eigvals(cov_a.numpy() @ cov_b.numpy())
    assert np.abs(eig.imag).max() < 1e-8 and eig.real.min() > 0
    trace_sqrt = np.sqrt(eig.real).sum()
    expected = float((mean_a - mean_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b)) - 2 * trace_sqrt
    assert expected > 1.0  # a non-trivial distance, so the comparison below means something
    assert frechet_distance_from_stats(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-9)
    fa, fb = features_with_stats(mean_a, cov_a, 400, seed=10), features_with_stats(mean_b, cov_b, 300, seed=11)
    assert frechet_distance(fa, fb) == pytest.approx(expected, rel=1e-8)


def test_symmetric_and_translation_sensitive():
    g = torch.Generator().manual_seed(12)
    a = torch.randn(200, 6, generator=g)
    b = torch.randn(120, 6, generator=g) @ torch.randn(6, 6, generator=g) + 0.5
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    # shifting one set by a vector v adds exactly |v|^2 on top of identical covariances
    v = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, -1.0])
    assert frechet_distance(a, a + v) == pytest.approx(6.0, abs=1e-5)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (torch.zeros(1, 3), torch.zeros(5, 3), "at least 2 samples"),
        (torch.zeros(5, 3), torch.zeros(1, 3), "at least 2 samples"),
        (torch.zeros(5, 3), torch.zeros(5, 4), "feature dimensions differ"),
        (torch.zeros(5), torch.zeros(5, 3), r"shape \(N, D\)"),
        (torch.full((5, 3), float("nan")), torch.zeros(5, 3), "NaN or inf"),
        ([[0.0, 1.0], [1.0, 0.0]], torch.zeros(5, 2), "torch.Tensor or numpy array"),
    ],
)
def test_bad_inputs_raise(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


def test_mismatched_stats_raise():
    with pytest.raises(ValueError, match="cov_b must have shape"):
        frechet_distance_from_stats(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(2))
