"""Frechet distance between Gaussians fitted to two feature sets (the statistic behind FID).

FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).

Why this form: S_a^1/2 S_b S_a^1/2 is symmetric positive semi-definite, so its square root comes
from a symmetric eigendecomposition (real eigenvalues, tiny negatives from round-off clipped to
0). That is robust where the textbook sqrtm(S_a S_b) of a non-symmetric product can return
complex parts, and needs no scipy. Everything is computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_features(features: Tensor | np.ndarray, name: str) -> Tensor:
    """A finite (N, D) float64 tensor with N >= 2, or a ValueError saying what is wrong."""
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not isinstance(features, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array of shape (N, D), got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples to estimate a covariance, got {features.shape[0]}")
    if features.shape[1] < 1:
        raise ValueError(f"{name} needs at least 1 feature dimension, got {features.shape[1]}")
    if not (features.is_floating_point() or features.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {features.dtype}")
    features = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or inf values; only finite values are allowed")
    return features


def feature_stats(features: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64 (as np.cov, ddof=1)."""
    features = _as_features(features, "features")
    mean = features.mean(0)
    centred = features - mean
    cov = centred.T @ centred / (features.shape[0] - 1)
    return mean, cov


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix; eigenvalues below 0 (round-off) count as 0."""
    vals, vecs = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance_from_stats(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """Frechet distance between N(mean_a, cov_a) and N(mean_b, cov_b); covariances must be PSD."""
    mean_a, cov_a, mean_b, cov_b = (torch.as_tensor(v, dtype=torch.float64) for v in (mean_a, cov_a, mean_b, cov_b))
    if mean_a.ndim != 1 or mean_a.shape[0] < 1:
        raise ValueError(f"mean_a must have shape (D,) with D >= 1, got {tuple(mean_a.shape)}")
    d = mean_a.shape[0]
    for name, v, shape in (("mean_b", mean_b, (d,)), ("cov_a", cov_a, (d, d)), ("cov_b", cov_b, (d, d))):
        if tuple(v.shape) != shape:
            raise ValueError(
                f"mismatched Gaussian statistics: mean_a has shape {tuple(mean_a.shape)}, so {name} must have "
                f"shape {shape}, got {tuple(v.shape)}"
            )
    sqrt_a = _psd_sqrt(cov_a)
    inner = sqrt_a @ cov_b @ sqrt_a
    vals = torch.linalg.eigvalsh(0.5 * (inner + inner.T))
    trace_sqrt = vals.clamp(min=0).sqrt().sum()
    fd = (mean_a - mean_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * trace_sqrt
    # FD >= 0 exactly; round-off can leave a tiny negative for identical inputs
    return max(float(fd), 0.0)


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to (N_a, D) and (N_b, D) feature sets.

    The estimate is biased upward for finite N (two sets from one distribution give FD > 0, shrinking
    about like 1/N), so compare only values computed with the same sample counts and read them
    against a real-vs-real floor (``difflab.eval.metrics.real_vs_real_floor``).
    """
    feats_a = _as_features(feats_a, "feats_a")
    feats_b = _as_features(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"feature dimensions differ: feats_a has {feats_a.shape[1]}, feats_b has {feats_b.shape[1]}; "
            "both sets must come from the same feature extractor"
        )
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))
