"""Training objectives: L_simple (eps / x0 / v targets, optional min-SNR-gamma weighting),
the variational bound (L_T, KL terms L_{t-1}, discretized decoder L_0), learned variance
with L_hybrid = L_simple + lambda L_VLB, importance-sampled timesteps, and NLL in bits/dim.

An objective is `loss(denoiser, x0, cond, generator) -> (per-example loss, logs)`; the
training loop knows nothing else. VLB terms are in bits per dimension (mean over dims / ln 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.process import (
    Prediction,
    check_data,
    check_prediction_type,
    check_variance_type,
    model_log_variance,
    posterior_mean_var,
    q_mean_var,
    q_sample,
)
from difflab.schedules import Schedule, broadcast

LOSS_TYPES = ("simple", "hybrid", "vlb")
TIME_KINDS = ("discrete", "continuous")
WEIGHTINGS = ("none", "min_snr")
LN2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


# ---------------------------------------------------------------- Gaussian pieces
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) for 8-bit data scaled to [-1, 1] under N(mean, e^(2 log_scale)) integrated
    over each pixel's bin of width 2/255; the outermost bins extend to -inf and +inf, so
    the 256 probabilities sum to 1."""
    x, mean, log_scale = (v.to(torch.float64) for v in torch.broadcast_tensors(x, mean, log_scale))
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255)
    lower = inv_std * (x - mean - 1.0 / 255)
    # log_ndtr keeps the open-ended edge bins finite far in the tails
    first_bin = torch.special.log_ndtr(upper)
    last_bin = torch.special.log_ndtr(-lower)
    inner = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-300))
    return torch.where(x < -0.999, first_bin, torch.where(x > 0.999, last_bin, inner))


# ---------------------------------------------------------------- the variational bound
def prior_bpd(schedule: Schedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) per example, bits/dim (no parameters: a check that
    the schedule really ends at noise)."""
    t = torch.full((x0.shape[0],), schedule.T - 1, device=x0.device)
    mean, var = q_mean_var(schedule, x0.to(torch.float64), t)
    return (
        mean_flat(normal_kl(mean, torch.log(var).expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean))) / LN2
    )


def vlb_term(schedule: Schedule, pred: Prediction, x0: Tensor, x_t: Tensor, t: Tensor, variance: str) -> Tensor:
    """L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL
    L_0 = -log p(x0 | x_1) at t = 0, per example in bits/dim."""
    true_mean, _, true_logvar = posterior_mean_var(schedule, x0, x_t, t)
    model_mean, _, _ = posterior_mean_var(schedule, pred.x0, x_t, t)
    model_logvar = model_log_variance(schedule, t, variance, x_t, pred.var_frac)
    kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / LN2
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / LN2
    return torch.where(t == 0, nll.to(kl.dtype), kl)


# ---------------------------------------------------------------- timestep samplers
class UniformTimesteps:
    """t ~ U{0..T-1}, weight 1."""

    def __init__(self, T: int):
        self.T = T

    def sample(self, batch: int, device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        t = torch.randint(0, self.T, (batch,), generator=generator, device="cpu").to(device)
        return t, torch.ones(batch, device=device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ContinuousTimesteps(UniformTimesteps):
    """Continuous time (Song et al. 2021): t ~ U[0, T - 1], fractional, weight 1. The network
    then learns every noise level between the grid points, so it serves the reverse SDE and
    the probability-flow ODE at any time as well as the discrete samplers at the grid."""

    def sample(self, batch: int, device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        t = torch.rand(batch, generator=generator, dtype=torch.float64) * (self.T - 1)
        return t.to(device), torch.ones(batch, device=device)


class ImportanceTimesteps(UniformTimesteps):
    """Nichol & Dhariwal's importance sampling: p_t ∝ sqrt(E[L_t^2]) over the last
    `history` losses of each t (uniform until every t has that many), mixed with a little
    uniform mass; examples are weighted by 1 / (T p_t) so the estimate stays unbiased."""

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 1e-3):
        super().__init__(T)
        self.history, self.uniform_prob = history, uniform_prob
        self.losses = torch.zeros(T, history, dtype=torch.float64)
        self.counts = torch.zeros(T, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> Tensor:
        if not self.warmed_up():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = self.losses.pow(2).mean(1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, batch: int, device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t.to(device), (1.0 / (self.T * p[t])).float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[ti] >= self.history:
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = li
            else:
                self.losses[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


# ---------------------------------------------------------------- the objective
def snr_weight(alpha_bar: Tensor, target: str, gamma: float) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023) expressed for each target: the x0-space weight
    min(SNR, gamma) divided by what the target's MSE already carries."""
    snr = alpha_bar / (1.0 - alpha_bar)
    if target == "x0":
        return snr.clamp(max=gamma)
    if target == "eps":
        return (gamma / snr).clamp(max=1.0)
    return snr.clamp(max=gamma) / (snr + 1.0)


class DiffusionLoss:
    """The denoising objective of one Gaussian diffusion.

    loss_type: "simple" (MSE on `target`), "hybrid" (simple + lambda_vlb * T * L_t with the
    mean's gradient stopped in the VLB term, for learned variance), "vlb" (T * L_t alone).
    `target` defaults to the denoiser's own parameterisation. With `importance=True`, t is
    importance-sampled from the history of the losses; with `time="continuous"` it is uniform
    on [0, T - 1] and fractional (`ContinuousTimesteps`).
    """

    def __init__(
        self,
        schedule: Schedule,
        loss_type: str = "simple",
        target: str | None = None,
        weighting: str = "none",
        snr_gamma: float = 5.0,
        lambda_vlb: float = 1e-3,
        importance: bool = False,
        time: str = "discrete",
    ):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
        if target is not None:
            check_prediction_type(target)
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
        self.schedule, self.loss_type, self.target = schedule, loss_type, target
        self.weighting, self.snr_gamma, self.lambda_vlb = weighting, snr_gamma, lambda_vlb
        if time not in TIME_KINDS:
            raise ValueError(f"unknown time {time!r}; allowed: {', '.join(TIME_KINDS)}")
        if time == "continuous" and (loss_type != "simple" or importance):
            raise ValueError(
                f'continuous time trains loss_type = "simple" without importance sampling (the bound and its '
                f"importance weights are sums over the discrete chain), got loss_type={loss_type!r}, "
                f"importance={importance}"
            )
        if importance:
            self.timesteps = ImportanceTimesteps(schedule.T)
        else:
            self.timesteps = (ContinuousTimesteps if time == "continuous" else UniformTimesteps)(schedule.T)

    def __call__(
        self, denoiser: Denoiser, x0: Tensor, cond: dict | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict]:
        check_data(x0)
        t, weights = self.timesteps.sample(x0.shape[0], x0.device, generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = q_sample(self.schedule, x0, t, eps)
        pred = denoiser(x_t, t, cond)
        alpha_bar = self.schedule.alpha_bar_at(t).to(x0.device)
        logs: dict[str, Tensor] = {}

        # at least float32 (bf16 data keeps a float32 loss), float64 data keeps float64 for every loss type
        loss = torch.zeros(x0.shape[0], device=x0.device, dtype=torch.promote_types(x0.dtype, torch.float32))
        if self.loss_type != "vlb":
            target = self.target or denoiser.prediction
            truth = {
                "eps": eps,
                "x0": x0,
                "v": broadcast(alpha_bar.sqrt(), x0) * eps - broadcast((1 - alpha_bar).sqrt(), x0) * x0,
            }[target]
            mse = mean_flat((pred.target(target, alpha_bar) - truth) ** 2)
            if self.weighting == "min_snr":
                mse = mse * snr_weight(alpha_bar, target, self.snr_gamma).to(mse.dtype)
            loss = loss + mse
            logs["mse"] = mse.detach()
        if self.loss_type != "simple":
            check_variance_type(denoiser.variance)
            if self.loss_type == "hybrid":
                # stop the bound's gradient through the mean: in L_hybrid it trains the variance
                pred = Prediction(x0=pred.x0.detach(), eps=pred.eps.detach(), var_frac=pred.var_frac)
            vb = vlb_term(self.schedule, pred, x0, x_t, t, denoiser.variance).to(loss.dtype)
            scale = self.schedule.T * (self.lambda_vlb if self.loss_type == "hybrid" else 1.0)
            loss = loss + scale * vb
            logs["vb"] = vb.detach()
        self.timesteps.update(t, loss.detach())
        logs["t"] = t
        return loss * weights, logs


@torch.no_grad()
def nll_bits_per_dim(
    denoiser: Denoiser,
    x0: Tensor,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The full variational bound for a batch, in bits/dim: prior + sum over all T terms.

    Returns per-example tensors: "total", "prior", "vb" (B, T) and "x0_mse" (B, T).
    """
    from tqdm.auto import tqdm

    check_data(x0)
    schedule = denoiser.schedule
    B, T = x0.shape[0], schedule.T
    vb = torch.zeros(B, T, dtype=torch.float64)
    mse = torch.zeros(B, T, dtype=torch.float64)
    for i in tqdm(range(T - 1, -1, -1), disable=not progress, desc="bits/dim", leave=False):
        t = torch.full((B,), i, device=x0.device, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = q_sample(schedule, x0, t, eps)
        pred = denoiser(x_t, t, cond)
        vb[:, i] = vlb_term(schedule, pred, x0, x_t, t, denoiser.variance).cpu()
        mse[:, i] = mean_flat((pred.x0 - x0) ** 2).double().cpu()
    prior = prior_bpd(schedule, x0).cpu()
    return {"total": vb.sum(1) + prior, "prior": prior, "vb": vb, "x0_mse": mse}
