"""Probability-flow ODE solvers in sigma space (Karras et al. 2022; k-diffusion).

They work in VE coordinates x = x_vp / sqrt(alpha_bar), where the ODE is dx / dsigma = eps
and x0_hat = x - sigma eps; the denoiser is queried at t = schedule.sigma_to_t(sigma) with
x_vp = x sqrt(alpha_bar) = x / sqrt(1 + sigma^2). The listed timesteps give the noise levels
and a final step goes to sigma = 0: a plain step to x0_hat, never a division by sigma = 0
(k-diffusion #37, #43). Samplers take x_T in VP coordinates, like all others.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.loop import Callback, Generators, SamplerLoop
from difflab.samplers.steps import heun_step


class VELevels:
    """The noise levels of one call: sigma_i (with sigma_n = 0 appended) and the VP<->VE scales."""

    def __init__(self, loop: SamplerLoop):
        ab = loop.alpha_bar
        if ab[0] <= 0.0:
            raise ValueError(
                "sigma-space solvers need alpha_bar > 0 at the first timestep (finite sigma); this schedule "
                "has zero terminal SNR: start below T-1 or use ddim/ddpm"
            )
        self.sigma = [math.sqrt((1.0 - a) / a) for a in ab] + [0.0]
        self.to_vp = [math.sqrt(a) for a in ab] + [1.0]  # x_vp = x_ve * sqrt(alpha_bar)

    def vp(self, x: Tensor, i: int) -> Tensor:
        return x * self.to_vp[i]

    def ve(self, x_vp: Tensor, i: int) -> Tensor:
        return x_vp / self.to_vp[i]


def _loop(denoiser, x_T, timesteps, generator, callback, cond, progress, desc):
    loop = SamplerLoop(
        denoiser, x_T, timesteps, generator=generator, callback=callback, cond=cond, progress=progress, desc=desc
    )
    return loop, VELevels(loop)


@torch.no_grad()
def euler(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
) -> Tensor:
    """Euler steps x <- x + (sigma_next - sigma) eps; one NFE per listed timestep."""
    loop, lv = _loop(denoiser, x_T, timesteps, generator, callback, cond, progress, "euler")
    s = lv.sigma
    x = lv.ve(x_T, 0)
    for i in loop:
        pred = loop.denoise(lv.vp(x, i), i)
        x = pred.x0 if s[i + 1] == 0.0 else torch.add(x, pred.eps, alpha=s[i + 1] - s[i])
        loop.report(i, x, pred, scale=lv.to_vp[i + 1])
    return x


@torch.no_grad()
def heun(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1 without churn): an Euler step,
    corrected by the average of the slopes at both ends (`steps.heun_step`). The last step, to
    sigma = 0, is a plain Euler step onto x0_hat, so n timesteps cost 2n - 1 NFE."""
    loop, _ = _loop(denoiser, x_T, timesteps, generator, callback, cond, progress, "heun")
    x, last = x_T, len(loop) - 1
    clean = torch.full_like(loop.t_batch(0), -1)
    for i in loop:
        x, pred = heun_step(denoiser, x, loop.t_batch(i), clean if i == last else loop.t_batch(i + 1), cond)
        loop.nfe += 1 if i == last else 2
        loop.report(i, x, pred)
    return x


@torch.no_grad()
def dpmpp_2m(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep data-prediction solver, in sigma form:
    x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D, where D extrapolates x0_hat
    linearly in lambda = -log sigma from the previous step: D = (1 + 1/2r) x0 - (1/2r) x0_prev,
    r = h_prev / h. The first step and the step to sigma = 0 are first order (D = x0_hat)."""
    loop, lv = _loop(denoiser, x_T, timesteps, generator, callback, cond, progress, "dpmpp_2m")
    s = lv.sigma
    n = len(loop)
    ratio = [s[i + 1] / s[i] for i in range(n)]
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    # weight on x0_prev (0 = first order)
    w_prev = [0.0] * n
    for i in range(1, n - 1):
        w_prev[i] = -(lam[i + 1] - lam[i]) / (2.0 * (lam[i] - lam[i - 1]))
    x = lv.ve(x_T, 0)
    x0_prev = None
    for i in loop:
        pred = loop.denoise(lv.vp(x, i), i)
        if i == n - 1:
            x = pred.x0
        else:
            d = pred.x0 if w_prev[i] == 0.0 else torch.add(pred.x0 * (1.0 - w_prev[i]), x0_prev, alpha=w_prev[i])
            x = torch.add(x * ratio[i], d, alpha=1.0 - ratio[i])
        x0_prev = pred.x0
        loop.report(i, x, pred, scale=lv.to_vp[i + 1])
    return x
