"""Probability-flow ODE solvers in sigma space (Karras et al. 2022; k-diffusion), and the
shared machinery of the sigma-space samplers.

They work in VE coordinates x = x_vp / sqrt(alpha_bar), where the ODE is dx / dsigma = eps
and x0_hat = x - sigma eps; the denoiser is queried at t = schedule.sigma_to_t(sigma) with
x_vp = x sqrt(alpha_bar) = x / sqrt(1 + sigma^2). The listed timesteps give the noise levels
and a final step goes to sigma = 0: a plain step to x0_hat, never a division by sigma = 0
(k-diffusion #37, #43). Samplers take x_T in VP coordinates, like all others.

Every coefficient is a python float computed once per call; a step is a few in-place
tensor ops on the sampler's own state (never on x_T or a denoiser's output).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.loop import Callback, Generators, SamplerLoop

# Heun's trapezoid in sigma multiplies the change of x0_hat across a step by (rho - 1) / 2,
# rho = sigma / sigma_next; beyond this ratio that amplification makes it unstable (see `heun`).
STIFF_RATIO = 50.0


class VELevels:
    """The noise levels of one call: sigma_i (with sigma_n = 0 appended), the VP<->VE scales
    and lambda_i = -log sigma_i (the log-SNR / 2 the exponential integrators step in)."""

    def __init__(self, loop: SamplerLoop):
        ab = loop.alpha_bar
        if ab[0] <= 0.0:
            raise ValueError(
                "sigma-space solvers need alpha_bar > 0 at the first timestep (finite sigma); this schedule "
                "has zero terminal SNR: start below T-1 or use ddim/ddpm"
            )
        self.sigma = [math.sqrt((1.0 - a) / a) for a in ab] + [0.0]
        self.to_vp = [math.sqrt(a) for a in ab] + [1.0]  # x_vp = x_ve * sqrt(alpha_bar)
        self.lam = [-math.log(s) if s > 0.0 else math.inf for s in self.sigma]

    def vp(self, x: Tensor, i: int) -> Tensor:
        return x * self.to_vp[i]

    def ve(self, x_vp: Tensor, i: int) -> Tensor:
        return x_vp / self.to_vp[i]

    def h(self, i: int) -> float:
        """The step i -> i + 1 in lambda (inf for the step to sigma = 0)."""
        return self.lam[i + 1] - self.lam[i]


def make_loop(denoiser, x_T, timesteps, generator, callback, cond, progress, desc) -> tuple[SamplerLoop, VELevels]:
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
    loop, lv = make_loop(denoiser, x_T, timesteps, generator, callback, cond, progress, "euler")
    s = lv.sigma
    x = lv.ve(x_T, 0)
    for i in loop:
        pred = loop.denoise(lv.vp(x, i), i)
        x = pred.x0 if s[i + 1] == 0.0 else x.add_(pred.eps, alpha=s[i + 1] - s[i])
        loop.report(i, x, pred, scale=lv.to_vp[i + 1])
    return x


def heun_weight(rho: float, stiff_ratio: float = STIFF_RATIO) -> float:
    """Heun's step written as x_next = x_euler + w (x0_hat(x_euler, sigma_next) - x0_hat(x, sigma)).

    Karras et al.'s trapezoid in sigma (dx / dsigma = eps) has w = (rho - 1) / 2, rho = sigma /
    sigma_next: on a big drop of the noise level it multiplies the change of x0_hat by a large
    factor (the corrector's slope eps' = (x_euler - x0_hat') / sigma_next divides by a small
    sigma_next), which is how Heun collapses at low NFE on VP schedules (the step into
    sigma_min ~ 0.01, or the first step down from cosine's sigma_max ~ 2e4). Past `stiff_ratio`
    the step instead takes x0_hat linear in lambda = -log sigma under the exact integral of the
    flow (the exponential-integrator form of DPM-Solver, Lu et al. 2022, with its evaluations
    at both ends of the step): w = 1 - (1 - 1/rho) / log(rho), which is (rho - 1) / 2 +
    O((rho - 1)^2) as rho -> 1 (the step stays second order) and stays in (0, 1), so it cannot
    amplify."""
    if rho <= stiff_ratio:
        return (rho - 1.0) / 2.0
    return 1.0 - (1.0 - 1.0 / rho) / math.log(rho)


def check_stiff_ratio(stiff_ratio: float) -> float:
    if not isinstance(stiff_ratio, (int, float)) or isinstance(stiff_ratio, bool) or not stiff_ratio > 1.0:
        raise ValueError(f"stiff_ratio must be a number > 1 (math.inf: the trapezoid everywhere), got {stiff_ratio!r}")
    return float(stiff_ratio)


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
    stiff_ratio: float = STIFF_RATIO,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1 without churn): an Euler step,
    corrected with the slope at its end (`steps.heun_step` for per-example levels). A step
    whose noise level drops by more than `stiff_ratio` uses the exponential-integrator weight
    instead of the trapezoid in sigma (`heun_weight`); math.inf gives the plain trapezoid
    everywhere. The last step, to sigma = 0, is a plain Euler step onto x0_hat, so n timesteps
    cost 2n - 1 NFE."""
    stiff_ratio = check_stiff_ratio(stiff_ratio)
    loop, lv = make_loop(denoiser, x_T, timesteps, generator, callback, cond, progress, "heun")
    s, n = lv.sigma, len(loop)
    w = [heun_weight(s[i] / s[i + 1], stiff_ratio) for i in range(n - 1)]
    x = lv.ve(x_T, 0)
    for i in loop:
        pred = loop.denoise(lv.vp(x, i), i)
        if i == n - 1:
            x = pred.x0
        else:
            x = torch.add(pred.x0, pred.eps, alpha=s[i + 1])  # the Euler (= DDIM) step
            x0_end = loop.denoise(lv.vp(x, i + 1), i + 1).x0
            x.add_(x0_end, alpha=w[i]).add_(pred.x0, alpha=-w[i])
        loop.report(i, x, pred, scale=lv.to_vp[i + 1])
    return x


def multistep_coefficients(lv: VELevels, n: int, eta: float = 0.0) -> list[tuple[float, float, float, float]]:
    """Per step (c_x, c_x0, c_prev, c_noise) of DPM-Solver++(2M), ODE (eta = 0) or SDE (eta = 1):
    x_next = c_x x + c_x0 x0_hat + c_prev x0_prev + c_noise z in VE coordinates.

    Lu et al. 2022 (DPM-Solver++: the 2M update and its SDE form, SDE-DPM-Solver++(2M)),
    with the noise share eta interpolating them as k-diffusion does: with g = (1 + eta) h,
    c_x = exp(-g), x0_hat weight 1 - exp(-g), noise sigma_next sqrt(1 - exp(-2 eta h)); the
    second-order term extrapolates x0_hat linearly in lambda from the previous step:
    (1 - exp(-g)) (x0 - x0_prev) / (2 r), r = h_prev / h. The first step and the step to
    sigma = 0 are first order (the latter lands on x0_hat exactly)."""
    out = []
    for i in range(n):
        h = lv.h(i)
        if math.isinf(h):  # onto sigma = 0
            out.append((0.0, 1.0, 0.0, 0.0))
            continue
        g = (1.0 + eta) * h
        c_x, c_d = math.exp(-g), -math.expm1(-g)
        c_noise = sde_noise_std(lv.sigma[i + 1], h, eta)
        c_prev = 0.0
        if i > 0:
            c_prev = -c_d * h / (2.0 * lv.h(i - 1))
        out.append((c_x, c_d - c_prev, c_prev, c_noise))
    return out


def sde_noise_std(sigma_next: float, h: float, eta: float) -> float:
    """The std of the fresh noise of a DPM-Solver++ SDE step of length h in lambda, landing at
    sigma_next: sigma_next sqrt(1 - e^(-2 eta h)), so that with the e^(-(1 + eta) h) share of
    the current noise the marginal std is sigma_next again (x_next = x0 + sigma_next eps')."""
    return sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)) if eta > 0.0 else 0.0


def run_multistep(loop: SamplerLoop, lv: VELevels, x_T: Tensor, eta: float = 0.0) -> Tensor:
    """The DPM-Solver++(2M) loop over precomputed `multistep_coefficients`."""
    coefs = multistep_coefficients(lv, len(loop), eta)
    x = lv.ve(x_T, 0)
    x0_prev = None
    for i in loop:
        pred = loop.denoise(lv.vp(x, i), i)
        c_x, c_x0, c_prev, c_noise = coefs[i]
        if c_x == 0.0 and c_prev == 0.0:
            x = pred.x0
        else:
            x.mul_(c_x).add_(pred.x0, alpha=c_x0)
            if c_prev != 0.0:
                x.add_(x0_prev, alpha=c_prev)
            if c_noise != 0.0:
                x.add_(loop.noise(x), alpha=c_noise)
        x0_prev = pred.x0
        loop.report(i, x, pred, scale=lv.to_vp[i + 1])
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
    loop, lv = make_loop(denoiser, x_T, timesteps, generator, callback, cond, progress, "dpmpp_2m")
    return run_multistep(loop, lv, x_T)
