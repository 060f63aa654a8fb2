"""Shared fixtures for the sampler tests (no tests here): a 2-D mixture with unequal weights
and non-isotropic covariances, toy denoisers, and a distribution check whose tolerances
come from the sample size."""

from __future__ import annotations

import math

import torch

from difflab.denoiser import Denoiser, MixtureDenoiser
from difflab.mixture import GaussianMixture
from difflab.process import Prediction
from difflab.schedules import Schedule


def rotated_cov(angle: float, std1: float, std2: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor([std1**2, std2**2], dtype=torch.float64)) @ rot.T


def make_mixture() -> GaussianMixture:
    """Three well-separated (>= 7 std apart) correlated Gaussians with weights 0.5 / 0.3 / 0.2."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.5, -2.5]])
    covs = torch.stack([rotated_cov(0.5, 0.5, 0.2), rotated_cov(-0.3, 0.4, 0.25), rotated_cov(1.2, 0.35, 0.2)])
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs)


MIXTURE = make_mixture()
SCHEDULES = {T: Schedule.make("linear", T=T) for T in (100, 1000)}


def mixture_denoiser(T: int = 100) -> MixtureDenoiser:
    return MixtureDenoiser(MIXTURE, SCHEDULES[T])


def distribution_z_scores(x: torch.Tensor, mixture: GaussianMixture = MIXTURE) -> dict[str, float]:
    """Standardised errors of each component's weight, mean and covariance entries.

    Samples are assigned to their most responsible component (the components are far apart,
    so misassignment is negligible). Under the null each score is ~N(0, 1): weight SE
    sqrt(w (1 - w) / N), mean SE sqrt(S_ii / n_k), covariance SE sqrt((S_ij^2 + S_ii S_jj) / n_k)."""
    x = x.to(torch.float64).reshape(-1, mixture.D)
    n = x.shape[0]
    label = mixture.responsibilities(x, torch.ones(())).argmax(1)
    z = {}
    for k in range(mixture.K):
        xs = x[label == k]
        w, mu, cov = mixture.weights[k].item(), mixture.means[k], mixture.covs[k]
        nk = xs.shape[0]
        z[f"w{k}"] = abs(nk / n - w) / math.sqrt(w * (1 - w) / n)
        if nk < 10:
            z[f"n{k}"] = math.inf
            continue
        mean_se = (cov.diagonal() / nk).sqrt()
        z[f"mean{k}"] = ((xs.mean(0) - mu).abs() / mean_se).max().item()
        cov_se = ((cov**2 + torch.outer(cov.diagonal(), cov.diagonal())) / nk).sqrt()
        z[f"cov{k}"] = ((torch.cov(xs.T) - cov).abs() / cov_se).max().item()
    return z


# 9 scores (3 weights, 3 max-of-2 means, 3 max-of-3 covariance entries): under the null the
# chance that any exceeds 4.5 is below 1e-4; samplers at "enough steps" must stay below it.
Z_LIMIT = 4.5


def assert_matches_mixture(x: torch.Tensor, mixture: GaussianMixture = MIXTURE, limit: float = Z_LIMIT) -> None:
    assert torch.isfinite(x).all()
    z = distribution_z_scores(x, mixture)
    bad = {k: round(v, 2) for k, v in z.items() if v > limit}
    assert not bad, f"sample does not match the mixture (z-scores above {limit}): {bad}; all: {z}"


class PointDenoiser(Denoiser):
    """The exact denoiser of data concentrated at one point c: x0_hat = c, eps consistent."""

    prediction = "x0"

    def __init__(self, c: torch.Tensor, schedule: Schedule, record: bool = False):
        self.c, self.schedule, self.sample_shape = c, schedule, tuple(c.shape)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.record = record

    def predict(self, x_t, t, cond):
        if (t < 0).any():
            raise AssertionError(f"denoiser queried at the clean level t={t.tolist()}")
        ab = self.schedule.alpha_bar_at(t).to(x_t.device)
        pred = Prediction.from_x0(self.c.to(x_t.dtype).expand_as(x_t), x_t, ab)
        if self.record:
            self.calls.append((t.clone(), pred.eps.clone()))
        return pred


class ConstantDenoiser(Denoiser):
    """Returns a fixed Prediction (for exact thresholding expectations and timing)."""

    def __init__(self, x0: torch.Tensor, schedule: Schedule, eps: torch.Tensor | None = None, var_frac=None):
        self.schedule, self.sample_shape = schedule, tuple(x0.shape[1:])
        self.pred = Prediction(x0, torch.zeros_like(x0) if eps is None else eps, var_frac)

    def predict(self, x_t, t, cond):
        return self.pred
