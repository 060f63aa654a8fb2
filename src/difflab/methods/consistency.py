"""Consistency models (Song et al. 2023; improved training, Song & Dhariwal 2023).

A consistency model f(x, sigma) maps any point of a probability-flow ODE trajectory to its
origin, so one evaluation turns noise into data. Its boundary condition f(x, sigma_min) = x
is built into the parameterisation (VE coordinates x = x0 + sigma z):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, sigma)
    c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)
    c_out  = (sigma - sigma_min) sigma_d / sqrt(sigma_d^2 + sigma^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_d^2)

so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly (these use sigma - sigma_min, not
EDM's sigma: the difference diffusers PR 6833 / issue 8547 were about). `ConsistencyDenoiser`
wraps a network so; it is registered as the "consistency" parameterisation, so a consistency
model folder loads and samples like any other.

Training pairs adjacent levels sigma_n < sigma_{n+1} of a Karras ladder: the online network
at x_{n+1} = x + sigma_{n+1} z is pulled towards a target network at x_n, where x_n is one
Heun step of a teacher (distillation, CD) or x + sigma_n z with the same z (training, CT).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflab.denoiser import DENOISER_FACTORIES, Denoiser
from difflab.losses import mean_flat
from difflab.process import Prediction, check_variance_type
from difflab.schedules import Schedule, broadcast

DISTANCES = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "inverse_gap")
LEVEL_SAMPLINGS = ("uniform", "lognormal")


# ---------------------------------------------------------------- the parameterisation
def boundary_scalings(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) at noise levels sigma (float64)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    sd2 = sigma_data**2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = (sigma - sigma_min) * sigma_data / (sd2 + sigma**2).sqrt()
    c_in = 1.0 / (sigma**2 + sd2).sqrt()
    return c_skip, c_out, c_in


class ConsistencyDenoiser(Denoiser):
    """A network F wrapped into f(x, sigma) = c_skip x + c_out F(c_in x, t) (VE coordinates),
    reported as the Prediction with x0 = f. `sigma_min` defaults to the schedule's smallest
    level (t = 0): that level is where f is the identity."""

    prediction = "consistency"

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        prediction: str = "consistency",
        variance: str = "fixed_small",
        sample_shape: tuple[int, ...] | None = None,
        sigma_data: float = 0.5,
        sigma_min: float | None = None,
    ):
        if prediction != "consistency":
            raise ValueError(f"ConsistencyDenoiser is the 'consistency' parameterisation, got {prediction!r}")
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, int | float) or not 0 < sigma_data < math.inf:
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
        self.net, self.schedule = net, schedule
        self.variance = check_variance_type(variance)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(schedule.sigmas[0]) if sigma_min is None else float(sigma_min)

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        from difflab.denoiser import network_dtype

        a = self.schedule.alpha_bar_at(t).to(x_t.device)
        sigma = ((1.0 - a) / a).sqrt()
        c_skip, c_out, c_in = boundary_scalings(sigma, self.sigma_data, self.sigma_min)
        x_ve = x_t / broadcast(a.sqrt(), x_t)
        net_in = (x_ve * broadcast(c_in, x_t)).to(network_dtype(self.net))
        out = self.net(net_in, t.to(torch.float32), cond).to(x_t.dtype)
        x0 = broadcast(c_skip, x_t) * x_ve + broadcast(c_out, x_t) * out
        return Prediction.from_x0(x0, x_t, a)


DENOISER_FACTORIES["consistency"] = ConsistencyDenoiser


def data_sigma(x0: Tensor) -> float:
    """sigma_data: the standard deviation of the training data (all elements)."""
    return float(x0.to(torch.float64).std())


# ---------------------------------------------------------------- levels and schedules
def karras_levels(schedule: Schedule, n: int, rho: float = 7.0) -> Tensor:
    """n fractional timesteps, ascending in noise, whose sigmas follow the Karras ladder between
    the schedule's smallest and largest sigma (level 0 is t = 0, level n - 1 is t = T - 1)."""
    from difflab.samplers.timesteps import sigma_spaced

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"a consistency ladder needs n >= 2 levels, got {n!r}")
    return sigma_spaced(schedule, n, "karras", rho).flip(0)


def ct_num_levels(k: int, total: int, s0: int = 2, s1: int = 150) -> int:
    """N(k) of consistency training: ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1,
    growing from s0 at k = 0 to s1 + 1 at k = K."""
    _check_progress(k, total)
    return math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_ema_decay(k: int, total: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> float:
    """mu(k) of consistency training: exp(s0 log(mu0) / N(k)); mu0 at k = 0, closer to 1 later."""
    return math.exp(s0 * math.log(mu0) / ct_num_levels(k, total, s0, s1))


def ict_num_levels(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) of improved consistency training: min(s0 2^floor(k / K'), s1) + 1, doubling every
    K' = floor(K / (log2(s1 / s0) + 1)) steps."""
    _check_progress(k, total)
    stage = max(1, math.floor(total / (math.log2(s1 // s0) + 1)))
    return min(s0 * 2 ** (k // stage), s1) + 1


def _check_progress(k: int, total: int) -> None:
    if not (isinstance(k, int) and isinstance(total, int) and total >= 1 and 0 <= k <= total):
        raise ValueError(f"need 0 <= k <= K with K >= 1 (training steps), got k={k!r}, K={total!r}")


def lognormal_pair_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's level sampling: pair (sigma_i, sigma_{i+1}) with probability proportional to the
    lognormal mass between them, erf((log s_{i+1} - P_mean) / (sqrt 2 P_std)) - erf(same at s_i)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


# ---------------------------------------------------------------- the loss
def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """sqrt(||x - y||^2 + c^2) - c per example: L2-like near 0, L1-like far away."""
    return ((x - y).flatten(1).pow(2).sum(1) + c * c).sqrt() - c


def default_huber_c(x: Tensor) -> float:
    """iCT's c = 0.00054 sqrt(d), d the number of dimensions of one example."""
    return 0.00054 * math.sqrt(x[0].numel())


class ConsistencyLoss:
    """d(f_online(x_{n+1}, t_{n+1}), f_target(x_n, t_n)) for adjacent levels of `levels`
    (ascending fractional timesteps). With a `teacher`, x_n is one Heun step of the teacher
    from x_{n+1} (CD); without, x_n = x + sigma_n z with the z of x_{n+1} (CT). The target pass
    runs without gradient and with the dropout masks of the online pass."""

    def __init__(
        self,
        levels: Tensor,
        distance: str = "l2",
        weighting: str = "uniform",
        level_sampling: str = "uniform",
        huber_c: float | None = None,
    ):
        for name, value, allowed in (("distance", distance, DISTANCES), ("weighting", weighting, WEIGHTINGS),
                                     ("level_sampling", level_sampling, LEVEL_SAMPLINGS)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        levels = torch.as_tensor(levels, dtype=torch.float64)
        if levels.ndim != 1 or levels.numel() < 2 or (levels.diff() <= 0).any():
            raise ValueError(f"levels must be >= 2 ascending timesteps, got {levels.tolist()}")
        self.levels, self.distance, self.weighting = levels, distance, weighting
        self.level_sampling, self.huber_c = level_sampling, huber_c

    def pair_probs(self, schedule: Schedule) -> Tensor:
        if self.level_sampling == "uniform":
            return torch.full((self.levels.numel() - 1,), 1.0 / (self.levels.numel() - 1), dtype=torch.float64)
        return lognormal_pair_probs(schedule.sigma_at(self.levels))

    def __call__(
        self,
        online: Denoiser,
        target: Denoiser,
        x0: Tensor,
        cond: dict | None = None,
        generator: torch.Generator | None = None,
        teacher: Denoiser | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        from difflab.process import q_sample
        from difflab.samplers.steps import heun_step

        schedule, batch = online.schedule, x0.shape[0]
        n = torch.multinomial(self.pair_probs(schedule), batch, replacement=True, generator=generator)
        t_lo, t_hi = self.levels[n].to(x0.device), self.levels[n + 1].to(x0.device)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_hi = q_sample(schedule, x0, t_hi, z)
        with torch.no_grad():
            if teacher is not None:
                x_lo, _ = heun_step(teacher, x_hi, t_hi, t_lo, cond)
            else:
                x_lo = q_sample(schedule, x0, t_lo, z)
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the target pass redraws the same dropout masks
            online_x0 = online(x_hi, t_hi, cond).x0
        with torch.no_grad():
            target_x0 = target(x_lo, t_lo, cond).x0
        if self.distance == "l2":
            d = mean_flat((online_x0 - target_x0) ** 2)
        else:
            d = pseudo_huber(online_x0, target_x0, self.huber_c if self.huber_c is not None else default_huber_c(x0))
        if self.weighting == "inverse_gap":
            s_lo, s_hi = schedule.sigma_at(t_lo), schedule.sigma_at(t_hi)
            d = d * (1.0 / (s_hi - s_lo)).to(d.dtype)
        return d, {"distance": d.detach()}

