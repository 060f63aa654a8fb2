"""Score-based samplers: annealed Langevin dynamics (NCSN, Song & Ermon 2019) and the
predictor-corrector sampler (Song et al. 2021). Both read the score from the denoiser as
score = -eps / sqrt(1 - alpha_bar) (`Prediction.score`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.ddpm import AncestralStep
from difflab.samplers.loop import Callback, Generators, SamplerLoop


def _check_positive(name: str, value, integer: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not value > 0 or (not integer and math.isinf(value)):
        kind = "an integer >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


@torch.no_grad()
def annealed_langevin(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
    n_steps: int = 20,
    step_size: float = 0.5,
    denoise: bool = True,
) -> Tensor:
    """NCSN's annealed Langevin dynamics over the noise levels of `timesteps` (descending).

    Runs in VE coordinates x = x_vp / sqrt(ab), whose marginal at level sigma_i is the data
    convolved with N(0, sigma_i^2), so a sample of one level starts the next. `n_steps` steps
    x <- x + (alpha_i / 2) score + sqrt(alpha_i) z per level with alpha_i = eps sigma_i^2 /
    sigma_L^2 (sigma_L the smallest level). `step_size` is the relative step alpha_i /
    sigma_i^2 = eps / sigma_L^2, which is what decides stability and bias (keep it well below
    2) and does not depend on the schedule. The VE score is sqrt(ab) times the VP score
    -eps / sqrt(1 - ab), i.e. -eps / sigma_i. With `denoise` (NCSNv2) a final NFE returns
    x0_hat = x - sigma_L eps instead of the noisy last iterate, landing on clean data.
    NFE = len(timesteps) * n_steps (+1)."""
    _check_positive("n_steps", n_steps, integer=True)
    _check_positive("step_size", step_size)
    loop = SamplerLoop(
        denoiser, x_T, timesteps, generator=generator, callback=callback, cond=cond, progress=progress, desc="langevin"
    )
    ab = loop.alpha_bar
    if ab[0] <= 0.0:
        raise ValueError("annealed Langevin needs a finite largest sigma (alpha_bar > 0 at the first timestep)")
    sigma = [math.sqrt((1.0 - a) / a) for a in ab]
    to_vp = [math.sqrt(a) for a in ab]
    # alpha_i = step_size * sigma_i^2; drift (alpha_i / 2) * (-eps / sigma_i), noise sqrt(alpha_i)
    drift = [-0.5 * step_size * s for s in sigma]
    noise = [math.sqrt(step_size) * s for s in sigma]
    x = x_T / to_vp[0]
    last = len(loop) - 1
    for i in loop:
        for _ in range(n_steps):
            pred = loop.denoise(x * to_vp[i], i)
            x.add_(pred.eps, alpha=drift[i]).add_(loop.noise(x), alpha=noise[i])  # x is this call's own
        if denoise and i == last:
            pred = loop.denoise(x * to_vp[i], i)
            x = pred.x0
            loop.report(i, x, pred)
        else:
            loop.report(i, x, pred, scale=to_vp[i])  # VP coordinates at this level
    return x


@torch.no_grad()
def predictor_corrector(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
    snr: float = 0.16,
    n_corrector: int = 1,
    variance: str | None = None,
) -> Tensor:
    """PC sampling (Song et al. 2021, Alg. 2 with the ancestral predictor): at each listed step,
    `n_corrector` Langevin corrector steps at the current level, then one ancestral (DDPM)
    predictor step to the next level; the last predictor step lands on x0_hat.

    Corrector (VP form, as in score_sde): x <- x + e g + sqrt(2e) z with g = -eps / sqrt(1 - ab)
    and e = 2 alpha (snr ||z|| / ||g||)^2, alpha = 1 - beta of the step, with the norms replaced
    by their pure-noise values ||z||^2 = D, ||g||^2 = D / (1 - ab): e = 2 alpha snr^2 (1 - ab).
    The reference code measures both norms and averages them over the batch, which ties an
    example to its batch-mates; measuring them per example instead makes the step depend on
    the state, and Langevin with a state-dependent step e(x) samples q / e, not q (we measured
    clearly overdispersed samples). A per-level step is exact in the limit and batch-free.
    NFE = len(timesteps) * (1 + n_corrector)."""
    _check_positive("snr", snr)
    _check_positive("n_corrector", n_corrector, integer=True)
    loop = SamplerLoop(
        denoiser, x_T, timesteps, generator=generator, callback=callback, cond=cond, progress=progress, desc="pc"
    )
    predictor = AncestralStep(denoiser, loop, variance)
    ab = loop.alpha_bar
    alphas = predictor.respaced.alphas.flip(0).tolist()
    # e = 2 alpha (snr ||z|| / ||g||)^2 with ||z||^2 -> D and ||g||^2 -> D / (1 - ab)
    e = [2.0 * al * snr**2 * (1.0 - a) for al, a in zip(alphas, ab)]
    c_eps = [-ei / math.sqrt(1.0 - a) for ei, a in zip(e, ab)]  # e * g = -e eps / sqrt(1 - ab)
    c_noise = [math.sqrt(2.0 * ei) for ei in e]
    x = x_T
    for i in loop:
        for _ in range(n_corrector):
            eps = loop.denoise(x, i).eps
            x = torch.add(x, eps, alpha=c_eps[i]).add_(loop.noise(x), alpha=c_noise[i])
        pred = loop.denoise(x, i)
        x = predictor(i, x, pred)
        loop.report(i, x, pred)
    return x
