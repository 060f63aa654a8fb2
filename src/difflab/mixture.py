"""Gaussian-mixture data distributions, whose denoiser E[x0 | x_t] is known in closed form.

If x0 ~ sum_k w_k N(mu_k, S_k) and x_t = sqrt(a) x0 + sqrt(1 - a) eps, then given component
k, x_t ~ N(sqrt(a) mu_k, C_k) with C_k = a S_k + (1 - a) I, and
E[x0 | x_t, k] = mu_k + sqrt(a) S_k C_k^{-1} (x_t - sqrt(a) mu_k); the components are
weighted by their posterior responsibilities. Working in each S_k's eigenbasis makes this
O(B K D^2) for any per-example a, so it scales to a 64-D oracle with a large batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianMixture:
    """sum_k w_k N(mu_k, S_k) in D dimensions (float64 throughout)."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        K, D = means.shape
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
        if covs.shape != (K, D, D):
            raise ValueError(f"covs must have shape ({K}, {D}, {D}), got {tuple(covs.shape)}")
        if not torch.allclose(covs, covs.transpose(1, 2)):
            raise ValueError("covariances must be symmetric")
        evals, evecs = torch.linalg.eigh(covs)
        if (evals <= 0).any():
            raise ValueError("covariances must be positive definite")
        self.weights = weights / weights.sum()
        self.means, self.covs = means, covs
        self.evals, self.evecs = evals, evecs  # S_k = U_k diag(l_k) U_k^T
        self.K, self.D = K, D

    @classmethod
    def isotropic(cls, weights: Tensor, means: Tensor, std: float | Tensor) -> GaussianMixture:
        means = torch.as_tensor(means, dtype=torch.float64)
        K, D = means.shape
        std = torch.as_tensor(std, dtype=torch.float64).expand(K)
        covs = torch.eye(D, dtype=torch.float64).expand(K, D, D) * (std**2).view(K, 1, 1)
        return cls(weights, means, covs)

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, dtype=torch.float64, generator=generator)
        # x = mu + U diag(sqrt(l)) z
        x = self.means[k] + torch.einsum("nij,nj->ni", self.evecs[k], self.evals[k].sqrt() * z)
        return (x, k) if return_labels else x

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        m = self.mean()
        centred = self.means - m
        return torch.einsum("k,kij->ij", self.weights, self.covs + centred[:, :, None] * centred[:, None, :])

    def noised(self, alpha_bar: float) -> GaussianMixture:
        """The marginal q(x_t) at one noise level: again a Gaussian mixture."""
        a = float(alpha_bar)
        eye = torch.eye(self.D, dtype=torch.float64)
        return GaussianMixture(self.weights, a**0.5 * self.means, a * self.covs + (1 - a) * eye)

    def _component_terms(self, x_t: Tensor, alpha_bar: Tensor):
        """Per-component log-densities of x_t and the rotated residual, in the eigenbasis."""
        a = alpha_bar.to(torch.float64).reshape(-1, 1, 1)  # (B, 1, 1)
        resid = x_t[:, None, :] - a.sqrt() * self.means[None]  # (B, K, D)
        y = torch.einsum("kji,bkj->bki", self.evecs, resid)  # U_k^T resid
        c = a * self.evals[None] + (1.0 - a)  # eigenvalues of C_k, (B, K, D)
        log_n = -0.5 * ((y**2 / c).sum(-1) + torch.log(c).sum(-1) + self.D * math.log(2 * math.pi))
        return log_n + torch.log(self.weights)[None], y, c, a

    def log_prob(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, self.D)
        log_joint, *_ = self._component_terms(x, torch.ones(x.shape[0], dtype=torch.float64))
        return torch.logsumexp(log_joint, dim=1)

    def responsibilities(self, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
        x = x_t.reshape(-1, self.D).to(torch.float64)
        log_joint, *_ = self._component_terms(x, torch.as_tensor(alpha_bar).expand(x.shape[0]))
        return torch.softmax(log_joint, dim=1)

    def posterior_mean(self, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
        """E[x0 | x_t] for x_t of shape (B, ...) with B*... = B*D and per-example alpha_bar."""
        shape = x_t.shape
        x = x_t.reshape(shape[0], self.D).to(torch.float64)
        a = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device).expand(shape[0])
        log_joint, y, c, a3 = self._component_terms(x, a)
        r = torch.softmax(log_joint, dim=1)  # (B, K)
        shrunk = a3.sqrt() * self.evals[None] / c * y  # sqrt(a) diag(l) C^-1 in the eigenbasis
        cond_means = self.means[None] + torch.einsum("kij,bkj->bki", self.evecs, shrunk)
        return torch.einsum("bk,bkd->bd", r, cond_means).reshape(shape).to(x_t.dtype)
