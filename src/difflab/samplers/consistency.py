"""Multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(x_T, T), then for each
further listed timestep t: re-noise x0 to t with fresh noise and map it back, x0 = f(x_t, t).
One listed timestep is one-step generation. Works with any denoiser (its x0_hat is f); made
for consistency models, whose x0_hat is already a sample, not an average."""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.loop import Callback, Generators, SamplerLoop
from difflab.samplers.steps import renoise


@torch.no_grad()
def consistency(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
) -> Tensor:
    """One network evaluation per listed timestep; the result is the last x0_hat."""
    loop = SamplerLoop(
        denoiser, x_T, timesteps, generator=generator, callback=callback, cond=cond, progress=progress,
        desc="consistency",
    )  # fmt: skip
    x = x_T
    for i in loop:
        if i > 0:
            x = renoise(x, loop.alpha_bar[i], loop.noise(x))
        pred = loop.denoise(x, i)
        x = pred.x0
        loop.report(i, x, pred)
    return x
