"""Ancestral DDPM sampling (Ho et al. 2020; Nichol & Dhariwal 2021 for learned variance and
respacing): x_{prev} ~ N(posterior mean(x0_hat, x_t), Sigma) on any subset of the chain.

A subset of steps is its own Markov chain: `schedule.respace(timesteps)` gives its betas
(from alpha_bar ratios), posterior coefficients and variances, so fixed-small, fixed-large and
learned variances all refer to the *respaced* betas. The last step goes to alpha_bar_prev = 1
(denoising-diffusion-pytorch #18, #81): its posterior mean is x0_hat and no noise is added.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.process import check_variance_type, model_log_variance
from difflab.samplers.loop import Callback, Generators, SamplerLoop


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
    variance: str | None = None,
) -> Tensor:
    """Ancestral sampling over integer `timesteps` (descending). `variance` overrides the
    denoiser's ("fixed_small" = beta tilde, "fixed_large" = beta, "learned")."""
    loop = SamplerLoop(
        denoiser, x_T, timesteps, generator=generator, callback=callback, cond=cond, progress=progress, desc="ddpm"
    )
    step = AncestralStep(denoiser, loop, variance)
    x = x_T
    for i in loop:
        pred = loop.denoise(x, i)
        x = step(i, x, pred)
        loop.report(i, x, pred)
    return x


class AncestralStep:
    """The reverse-diffusion update x_t -> x_{prev} of one sampling call, with its coefficients
    precomputed (python floats) for the respaced chain. Shared with the PC sampler's predictor."""

    def __init__(self, denoiser: Denoiser, loop: SamplerLoop, variance: str | None = None):
        if not loop.is_integer:
            raise ValueError(
                "ancestral sampling needs integer timesteps (a sub-chain of the schedule); "
                "use spacing 'linspace', 'trailing', 'leading' or a respacing string, not 'karras'/'geometric'"
            )
        self.kind = check_variance_type(variance if variance is not None else denoiser.variance)
        n = len(loop)
        self.respaced = denoiser.schedule.respace(loop.timesteps)
        # loop step i (descending) is respaced index j = n - 1 - i
        self.j = torch.arange(n - 1, -1, -1)
        self.c_x0 = self.respaced.posterior_mean_coef_x0.flip(0).tolist()
        self.c_xt = self.respaced.posterior_mean_coef_xt.flip(0).tolist()
        if self.kind != "learned":
            log_var = model_log_variance(self.respaced, self.j, self.kind, like=torch.zeros(n, dtype=torch.float64))
            self.std = (0.5 * log_var).exp().tolist()
        self.loop = loop

    def __call__(self, i: int, x: Tensor, pred) -> Tensor:
        if i == len(self.c_x0) - 1:  # onto x0: alpha_bar_prev = 1, mean coefficients (1, 0), no noise
            return pred.x0
        mean = torch.mul(pred.x0, self.c_x0[i]).add_(x, alpha=self.c_xt[i])
        if self.kind == "learned":
            j = self.j[i : i + 1].to(x.device)
            std = (0.5 * model_log_variance(self.respaced, j, "learned", like=x, var_frac=pred.var_frac)).exp()
            return mean.addcmul_(std, self.loop.noise(x))
        return mean.add_(self.loop.noise(x), alpha=self.std[i])
