"""DDIM (Song et al. 2021): x_prev = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z with
s = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'), where a, a' are alpha_bar at the current
and the next listed timestep (a' = 1 after the last, so the result is x0_hat exactly).

eta = 0 is the deterministic probability-flow discretisation (and invertible: `ddim_invert`);
eta = 1 on all T steps is DDPM with fixed-small variance, step for step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.loop import Callback, Generators, SamplerLoop
from difflab.samplers.steps import ddim_coefficients


def check_eta(eta: float) -> float:
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0 or math.isinf(eta):
        raise ValueError(f"eta must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")
    return float(eta)


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
    eta: float = 0.0,
) -> Tensor:
    """DDIM over descending `timesteps` (integer or fractional indices)."""
    eta = check_eta(eta)
    loop = SamplerLoop(
        denoiser, x_T, timesteps, generator=generator, callback=callback, cond=cond, progress=progress, desc="ddim"
    )
    ab = loop.alpha_bar
    x, last = x_T, len(loop) - 1
    coefs = [ddim_coefficients(ab[i], ab[i + 1], eta) for i in range(last)]
    for i in loop:
        pred = loop.denoise(x, i)
        if i == last:  # a' = 1: exactly x0_hat
            x = pred.x0
        else:  # `steps.ddim_step`, fused: straight from the network output, one new tensor
            c_x0, c_eps, c_noise = coefs[i]
            x = pred.combine(c_x0, c_eps)
            if eta > 0.0:
                x.add_(loop.noise(x), alpha=c_noise)
        loop.report(i, x, pred)
    return x


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    x0: Tensor,
    timesteps: Tensor,
    *,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
    refine: int = 0,
) -> Tensor:
    """Deterministic DDIM run backwards, x0 -> x_T, over the same descending `timesteps` that
    `ddim` uses to come back.

    In VE coordinates a DDIM step down is x_low = x_high + (sigma_low - sigma_high) eps(x_high),
    so its exact inverse is implicit: x_high = x_low + (sigma_high - sigma_low) eps(x_high). The
    usual inversion evaluates eps at x_low instead (queried at the higher level), which is off
    by O(step): the round trip error shrinks like 1 / steps, but points near a boundary between
    modes can come back in the other mode. `refine` fixed-point iterations per step (each one
    more NFE) solve the implicit equation, making `ddim` undo the inversion far more closely.
    The callback reports steps in the order taken (step 0 leaves the clean data)."""
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0 (fixed-point iterations per step), got {refine!r}")
    loop = SamplerLoop(denoiser, x0, timesteps, callback=callback, cond=cond, progress=progress, desc="ddim inversion")
    n, ab = len(loop), loop.alpha_bar
    x, ab_cur = x0, 1.0
    for k in loop:
        i = n - 1 - k  # ascending through the descending list
        a = ab[i]
        c_x = math.sqrt(a / ab_cur)
        c_eps = math.sqrt(1.0 - a) - math.sqrt(a * (1.0 - ab_cur) / ab_cur)
        pred = loop.denoise(x, i)
        x_high = torch.add(x * c_x, pred.eps, alpha=c_eps)
        for _ in range(refine):
            pred = loop.denoise(x_high, i)
            x_high = torch.add(x * c_x, pred.eps, alpha=c_eps)
        x, ab_cur = x_high, a
        loop.report(k, x, pred, t=loop.t[i])
    return x


def slerp(z0: Tensor, z1: Tensor, alpha: float | Tensor) -> Tensor:
    """Spherical interpolation between noise tensors, per example (dims after the first):
    keeps the norm a Gaussian sample should have, where lerp would shrink it mid-way.
    Falls back to lerp for (nearly) parallel vectors. `alpha` is a float or a (B,) tensor."""
    z0, z1 = torch.broadcast_tensors(z0, z1)
    if z0.ndim < 2:
        return slerp(z0[None], z1[None], alpha)[0]
    flat0, flat1 = z0.flatten(1), z1.flatten(1)
    alpha = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device)
    if alpha.ndim > 1 or (alpha.ndim == 1 and alpha.numel() not in (1, z0.shape[0])):
        raise ValueError(f"alpha must be a float or a ({z0.shape[0]},) tensor, got shape {tuple(alpha.shape)}")
    alpha = alpha.reshape(-1, 1) if alpha.ndim == 1 else alpha
    cos = (flat0 * flat1).sum(1, keepdim=True) / (flat0.norm(dim=1, keepdim=True) * flat1.norm(dim=1, keepdim=True))
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, 1.0 - alpha, torch.sin((1.0 - alpha) * theta) / safe)
    w1 = torch.where(parallel, alpha, torch.sin(alpha * theta) / safe)
    return (w0 * flat0 + w1 * flat1).reshape(z0.shape)
