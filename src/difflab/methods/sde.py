"""Score SDEs in continuous time (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations"; equation numbers are that paper's, arXiv:2011.13456).

Each SDE is dx = f(x, u) du + g(u) dw on u in [0, 1] (u = 0 data, u = 1 prior), with a drift
linear in x, f(x, u) = drift_coef(u) x, so its marginal given the data is Gaussian in closed
form (Appendix B): q(x_u | x_0) = N(mean_coef(u) x_0, std(u)^2 I).

- `VPSDE`      dx = -1/2 beta(u) x du + sqrt(beta(u)) dw                        (Eq. 11)
- `SubVPSDE`   dx = -1/2 beta(u) x du + sqrt(beta(u) (1 - e^{-2 B(u)})) dw       (Eq. 12)
- `VESDE`      dx = sqrt(d sigma^2(u) / du) dw                                  (Eq. 9)
- `ScheduleSDE` the VP SDE whose marginal is a difflab `Schedule`'s continuous view, so a
  difflab denoiser is the exact score model of it (t = u T - 1, no interpolation of noise levels).

with beta(u) = beta_min + u (beta_max - beta_min), B(u) = int_0^u beta = beta_min u + u^2
(beta_max - beta_min) / 2 and sigma(u) = sigma_min (sigma_max / sigma_min)^u. Given a score
s(x, u) ~ grad_x log p_u(x), the reverse-time SDE has drift f - g^2 s (Eq. 6) and the
probability-flow ODE, whose solutions share the SDE's marginals, has drift f - 1/2 g^2 s (Eq. 13).

`score_from_denoiser` turns any difflab `Denoiser` into a score for any of these SDEs by
matching noise levels: x_u = m x_0 + s eps is, divided by c = sqrt(m^2 + s^2), a VP sample
with alpha_bar = m^2 / c^2, i.e. VE noise level sigma = s / m; its score is -eps_hat / s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from difflab.schedules import Schedule, broadcast

Score = Callable[[Tensor, Tensor], Tensor]  # (x, u) -> grad_x log p_u(x), u of shape (B,) float64


def as_times(u: Tensor | float, x: Tensor) -> Tensor:
    """u as a float64 (B,) tensor on x's device, checked to lie in [0, 1]."""
    u = torch.as_tensor(u, dtype=torch.float64, device=x.device)
    if u.ndim == 0:
        u = u.expand(x.shape[0])
    if u.shape != (x.shape[0],):
        raise ValueError(f"u must be a scalar or have shape ({x.shape[0]},), got {tuple(u.shape)}")
    return _check_u(u)


def _check_u(u: Tensor) -> Tensor:
    if (u < 0).any() or (u > 1).any() or not torch.isfinite(u).all():
        raise ValueError(f"continuous time u must lie in [0, 1], got {u.tolist()}")
    return u


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class SDE:
    """dx = drift_coef(u) x du + diffusion(u) dw with marginal N(mean_coef(u) x0, std(u)^2 I).

    Subclasses give `drift_coef`, `diffusion`, `mean_coef` and `std` of a float64 tensor u;
    everything else follows. `prior_std` is the std of the prior p_1 = N(0, prior_std^2 I).
    """

    prior_std: float = 1.0

    def drift_coef(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def diffusion(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def mean_coef(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def std(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- forward SDE (Eq. 5)
    def drift(self, x: Tensor, u: Tensor | float) -> Tensor:
        """f(x, u)."""
        return broadcast(self.drift_coef(as_times(u, x)), x) * x

    def marginal(self, x0: Tensor, u: Tensor | float) -> tuple[Tensor, Tensor]:
        """Mean and (broadcastable) std of q(x_u | x_0) (Appendix B)."""
        u = as_times(u, x0)
        return broadcast(self.mean_coef(u), x0) * x0, broadcast(self.std(u), x0)

    def sample_marginal(self, x0: Tensor, u: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """x_u ~ q(x_u | x_0)."""
        mean, std = self.marginal(x0, u)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return mean + std * noise

    # ---------------------------------------------------------------- prior p_1
    def prior_logp(self, x: Tensor) -> Tensor:
        """log N(x; 0, prior_std^2 I) per example (nats)."""
        d = x[0].numel()
        flat = x.flatten(1).to(torch.float64)
        var = self.prior_std**2
        return -0.5 * (flat.pow(2).sum(1) / var + d * math.log(2 * math.pi * var))

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        return self.prior_std * torch.randn(shape, generator=generator, dtype=torch.float64)

    # ---------------------------------------------------------------- reverse time
    def reverse_drift(self, x: Tensor, u: Tensor | float, score: Tensor) -> Tensor:
        """Drift of the reverse-time SDE, f - g^2 score (Eq. 6; integrate it with du < 0)."""
        g = broadcast(self.diffusion(as_times(u, x)), x)
        return self.drift(x, u) - g**2 * score

    def ode_drift(self, x: Tensor, u: Tensor | float, score: Tensor) -> Tensor:
        """Drift of the probability-flow ODE, f - 1/2 g^2 score (Eq. 13)."""
        g = broadcast(self.diffusion(as_times(u, x)), x)
        return self.drift(x, u) - 0.5 * g**2 * score


class _LinearBeta(SDE):
    """beta(u) = beta_min + u (beta_max - beta_min) and its integral B(u)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = _positive("beta_min", beta_min)
        self.beta_max = _positive("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(f"need beta_min <= beta_max, got {beta_min} and {beta_max}")

    def beta(self, u: Tensor) -> Tensor:
        return self.beta_min + u * (self.beta_max - self.beta_min)

    def integral(self, u: Tensor) -> Tensor:
        """B(u) = int_0^u beta(s) ds."""
        return self.beta_min * u + 0.5 * u**2 * (self.beta_max - self.beta_min)

    def drift_coef(self, u: Tensor) -> Tensor:
        return -0.5 * self.beta(u)

    def mean_coef(self, u: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.integral(u))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VPSDE(_LinearBeta):
    """Variance preserving (Eq. 11), DDPM's limit; defaults beta_min = 0.1, beta_max = 20 as in
    the paper (= T beta_i of Ho et al.'s linear schedule with T = 1000)."""

    def diffusion(self, u: Tensor) -> Tensor:
        return self.beta(u).sqrt()

    def std(self, u: Tensor) -> Tensor:
        return (-torch.expm1(-self.integral(u))).sqrt()  # sqrt(1 - e^{-B})


class SubVPSDE(_LinearBeta):
    """sub-VP (Eq. 12): the VP mean, variance (1 - e^{-B})^2 <= the VP variance."""

    def diffusion(self, u: Tensor) -> Tensor:
        return (self.beta(u) * -torch.expm1(-2.0 * self.integral(u))).sqrt()

    def std(self, u: Tensor) -> Tensor:
        return -torch.expm1(-self.integral(u))  # 1 - e^{-B}


class VESDE(SDE):
    """Variance exploding (Eq. 9), NCSN's limit: sigma(u) = sigma_min (sigma_max / sigma_min)^u,
    g(u) = sigma(u) sqrt(2 log(sigma_max / sigma_min)); defaults as the paper's CIFAR-10 runs.

    `exact_kernel=True` (default): std(u)^2 = sigma(u)^2 - sigma_min^2, the exact transition of
    the SDE from u = 0 (Appendix B). `exact_kernel=False`: std(u) = sigma(u), the perturbation
    kernel the paper's code trains and samples with (it treats x(0) as data already blurred by
    sigma_min); both have the same drift and diffusion. The prior is N(0, sigma_max^2 I).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, exact_kernel: bool = True):
        self.sigma_min = _positive("sigma_min", sigma_min)
        self.sigma_max = _positive("sigma_max", sigma_max)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        if not isinstance(exact_kernel, bool):
            raise ValueError(f"exact_kernel must be true or false, got {exact_kernel!r}")
        self.exact_kernel = exact_kernel
        self.prior_std = self.sigma_max
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, u: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(u * self.log_ratio)

    def drift_coef(self, u: Tensor) -> Tensor:
        return torch.zeros_like(u)

    def diffusion(self, u: Tensor) -> Tensor:
        return self.sigma(u) * math.sqrt(2.0 * self.log_ratio)  # sqrt(d sigma^2 / du)

    def mean_coef(self, u: Tensor) -> Tensor:
        return torch.ones_like(u)

    def std(self, u: Tensor) -> Tensor:
        sigma = self.sigma(u)
        return (sigma**2 - self.sigma_min**2).clamp(min=0).sqrt() if self.exact_kernel else sigma

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, exact_kernel={self.exact_kernel})"


class ScheduleSDE(SDE):
    """The VP SDE whose marginal is a difflab schedule's continuous view:
    mean_coef(u)^2 = alpha_bar(u) = `schedule.continuous(u)` (u = (t + 1) / T), std^2 = 1 - alpha_bar,
    with beta(u) = -d log alpha_bar / du, i.e. f = 1/2 (d log alpha_bar / du) x and g^2 = beta.

    alpha_bar is linear in t between grid points, so beta is exact (no finite differences) but
    jumps a little at each grid point (taken from the segment to the right). A zero-terminal-SNR
    schedule has alpha_bar(1) = 0 and beta -> inf there: stop the ODE at some u < 1.
    The VE ladders of `Schedule.ve` are VP schedules too (x_vp = x_ve / sqrt(1 + sigma^2)).
    """

    def __init__(self, schedule: Schedule):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"ScheduleSDE needs a difflab Schedule, got {type(schedule).__name__}")
        self.schedule = schedule

    def alpha_bar(self, u: Tensor) -> Tensor:
        return self.schedule.continuous(_check_u(u))

    def beta(self, u: Tensor) -> Tensor:
        T, ab = self.schedule.T, self.schedule.alpha_bar.to(u.device)
        grid = torch.cat([ab.new_ones(1), ab])  # alpha_bar at t = -1, 0, ..., T-1
        lo = (_check_u(u) * T).floor().long().clamp(max=T - 1)
        slope = T * (grid[lo + 1] - grid[lo])  # d alpha_bar / du on this segment
        return -slope / self.alpha_bar(u)

    def drift_coef(self, u: Tensor) -> Tensor:
        return -0.5 * self.beta(u)

    def diffusion(self, u: Tensor) -> Tensor:
        return self.beta(u).sqrt()

    def mean_coef(self, u: Tensor) -> Tensor:
        return self.alpha_bar(u).sqrt()

    def std(self, u: Tensor) -> Tensor:
        return (1.0 - self.alpha_bar(u)).sqrt()

    def __repr__(self) -> str:
        return f"ScheduleSDE({self.schedule!r})"


def score_from_denoiser(denoiser, sde: SDE | None = None, cond: dict | None = None) -> Score:
    """The score (x, u) -> grad_x log p_u(x) that a difflab `Denoiser` implies for `sde`
    (default: `ScheduleSDE(denoiser.schedule)`).

    For the denoiser's own schedule the query is direct: t = u T - 1 and score = -eps_hat /
    sqrt(1 - alpha_bar(u)) (`Prediction.score`). For another SDE (VP, sub-VP, VE) with marginal
    N(m x0, s^2 I), x_u / sqrt(m^2 + s^2) is a VP sample at VE level sigma = s / m, which
    `schedule.sigma_to_t` turns into a (fractional) index, and the score is -eps_hat / s. That
    level must lie within the schedule's range (an error names it otherwise); between t = -1
    and t = 0 the schedule interpolates towards clean data, where a network was never trained.
    """
    schedule = denoiser.schedule
    sde = ScheduleSDE(schedule) if sde is None else sde
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be a difflab.methods.sde.SDE, got {type(sde).__name__}")
    direct = isinstance(sde, ScheduleSDE) and sde.schedule is schedule

    def score(x: Tensor, u: Tensor | float) -> Tensor:
        u = as_times(u, x)
        m, s = sde.mean_coef(u), sde.std(u)
        if direct:
            t, x_vp = u * schedule.T - 1.0, x
        else:
            t, x_vp = schedule.sigma_to_t(s / m), x / broadcast((m**2 + s**2).sqrt(), x)
        eps = denoiser(x_vp, t, cond).eps
        return -eps / broadcast(s, eps)

    return score
