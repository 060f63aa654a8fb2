"""Single solver steps, shared by the samplers and by the losses that need a solver inside
training (progressive distillation's two teacher steps, consistency distillation's Heun step).

Everything is in VP coordinates (x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alpha_bar). Levels
are python floats (one level for the whole batch, as in a sampler) or (B,) tensors (one per
example, as in a training batch with random t).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.process import Prediction
from difflab.schedules import broadcast

Level = float | Tensor


def _scaled(coef: Level, x: Tensor) -> Tensor:
    return x * coef if isinstance(coef, float) else x * broadcast(coef, x)


def _sqrt(a: Level) -> Level:
    return a**0.5 if isinstance(a, float) else a.to(torch.float64).sqrt()


def renoise(x0: Tensor, alpha_bar: Level, noise: Tensor) -> Tensor:
    """x0 taken to level alpha_bar: sqrt(a) x0 + sqrt(1 - a) noise (q(x_t | x0) with that noise)."""
    return _scaled(_sqrt(alpha_bar), x0) + _scaled(_sqrt(1.0 - alpha_bar), noise)


def ddim_step(
    pred: Prediction, alpha_bar_next: Level, *, eta: float = 0.0, alpha_bar: Level | None = None,
    noise: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One DDIM step from the level `pred` was made at to `alpha_bar_next`:
    sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z with s = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a').
    eta = 0 (deterministic, the default) needs neither the current level nor noise; it is the
    exact Euler step of the probability-flow ODE in (x / sqrt(a), sigma) coordinates."""
    if eta == 0.0:
        return renoise(pred.x0, alpha_bar_next, pred.eps)
    if alpha_bar is None or noise is None:
        raise ValueError("a stochastic DDIM step (eta > 0) needs the current alpha_bar and the noise")
    c_x0, c_eps, c_noise = ddim_coefficients(alpha_bar, alpha_bar_next, eta)
    return _scaled(c_x0, pred.x0) + _scaled(c_eps, pred.eps) + _scaled(c_noise, noise)


def ddim_coefficients(a: Level, a_next: Level, eta: float) -> tuple[Level, Level, Level]:
    """(c_x0, c_eps, c_noise) of one DDIM step from alpha_bar a to a_next (floats in, floats
    out: samplers precompute them once per call)."""
    if isinstance(a, float) and isinstance(a_next, float):
        s = eta * math.sqrt(max(0.0, (1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next))) if a < 1.0 else 0.0
        return math.sqrt(a_next), math.sqrt(max(0.0, 1.0 - a_next - s * s)), s
    a, a_next = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(a_next, dtype=torch.float64)
    s = eta * ((1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next)).clamp(min=0.0).sqrt()
    s = torch.where(a < 1.0, s, torch.zeros_like(s))
    return a_next.sqrt(), (1.0 - a_next - s * s).clamp(min=0.0).sqrt(), s


def heun_step(
    denoiser: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, cond: dict | None = None,
    pred: Prediction | None = None,
) -> tuple[Tensor, Prediction]:  # fmt: skip
    """One step of Heun's method on the probability-flow ODE from timestep t to t_next (per
    example, VP coordinates): an Euler step in sigma space, corrected by the slope at its end
    (Karras et al. 2022, Alg. 1). Where t_next is -1 (clean data) the step is the plain Euler
    step onto x0_hat. `pred` (the denoiser at (x, t)) is reused when given. Returns the new x
    and the prediction at (x, t)."""
    schedule = denoiser.schedule
    pred = denoiser(x, t, cond) if pred is None else pred
    a, a_next = schedule.alpha_bar_at(t).to(x.device), schedule.alpha_bar_at(t_next).to(x.device)
    x_euler = ddim_step(pred, a_next)
    final = a_next >= 1.0
    if bool(final.all()):
        return x_euler, pred
    # correct with the slope at the end: in VE coordinates x_ve' = x_ve + h (eps + eps') / 2
    pred_next = denoiser(x_euler, torch.where(final, t, t_next), cond)
    sigma, sigma_next = ((1.0 - a) / a).sqrt(), ((1.0 - a_next) / a_next).sqrt()
    h = sigma_next - sigma
    x_ve = _scaled(1.0 / a.sqrt(), x) + _scaled(h, (pred.eps + pred_next.eps) / 2.0)
    x_heun = _scaled(a_next.sqrt(), x_ve)
    return torch.where(broadcast(final, x).bool(), x_euler, x_heun), pred
