"""Stochastic sigma-space samplers: Euler ancestral and DPM-Solver++(2M) SDE.

Both inject fresh noise at every step but the last, with a noise share `eta` (1: the full
ancestral / SDE sampler, 0: the deterministic solver it extends: `euler`, `dpmpp_2m`). They
work in VE coordinates like `ode.py` and take x_T in VP coordinates like every sampler.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.ddim import check_eta
from difflab.samplers.loop import Callback, Generators
from difflab.samplers.ode import make_loop, run_multistep


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of one ancestral step from sigma to sigma_next (VE): a
    deterministic step to sigma_down, then noise of std sigma_up, with sigma_down^2 +
    sigma_up^2 = sigma_next^2. sigma_up = eta sigma_next sqrt(1 - sigma_next^2 / sigma^2) (capped
    at sigma_next) is the std of the DDPM posterior q(x_next | x, x0) in VE coordinates, so
    eta = 1 is ancestral DDPM sampling and the step is DDIM's with the same eta (Song et al.
    2021, eq. 16: s = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a') is sqrt(a') sigma_up)."""
    if sigma_next == 0.0:
        return 0.0, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1.0 - (sigma_next / sigma) ** 2)))
    return math.sqrt(sigma_next**2 - up**2), up


@torch.no_grad()
def euler_ancestral(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
    eta: float = 1.0,
) -> Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral): an Euler step to sigma_down,
    then fresh noise of std sigma_up (`ancestral_split`): x <- x0_hat + sigma_down eps +
    sigma_up z. eta = 0 is `euler`; one NFE per listed timestep; the last step lands on x0_hat."""
    eta = check_eta(eta)
    loop, lv = make_loop(denoiser, x_T, timesteps, generator, callback, cond, progress, "euler_a")
    s, n = lv.sigma, len(loop)
    split = [ancestral_split(s[i], s[i + 1], eta) for i in range(n)]
    x = lv.ve(x_T, 0)
    for i in loop:
        pred = loop.denoise(lv.vp(x, i), i)
        down, up = split[i]
        if s[i + 1] == 0.0:
            x = pred.x0
        else:
            x.add_(pred.eps, alpha=down - s[i])  # x = x0_hat + sigma eps: now x0_hat + sigma_down eps
            if eta > 0.0:
                x.add_(loop.noise(x), alpha=up)
        loop.report(i, x, pred, scale=lv.to_vp[i + 1])
    return x


@torch.no_grad()
def dpmpp_2m_sde(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, SDE-DPM-Solver++(2M)): the multistep
    data-prediction solver of the reverse SDE, x_next = e^-2h x + (1 - e^-2h) D +
    sigma_next sqrt(1 - e^-2h) z with h the step in lambda = -log sigma and D the x0_hat
    extrapolated from the previous step (`ode.multistep_coefficients`). Its first-order step is
    DDIM with eta = 1 (the DDPM posterior); eta = 0 is `dpmpp_2m`. One NFE per listed timestep."""
    eta = check_eta(eta)
    loop, lv = make_loop(denoiser, x_T, timesteps, generator, callback, cond, progress, "dpmpp_2m_sde")
    return run_multistep(loop, lv, x_T, eta)
