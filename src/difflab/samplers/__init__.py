"""Samplers: stateless functions `(denoiser, x_T, timesteps, *, generator, callback, cond,
progress, **options) -> x_0`, and `sample(...)`, the one entry point that picks the
timesteps, draws x_T and runs a sampler by name.

x_T is always in VP coordinates (x_T ~ N(0, I) at the first listed timestep) and every
sampler returns clean data (its last step lands on x0_hat). `steps` counts sampler steps,
not network evaluations: Heun costs 2 steps - 1, PC steps * (1 + n_corrector), Langevin
steps * n_steps + 1 NFE; every other sampler one NFE per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.ancestral import dpmpp_2m_sde, euler_ancestral
from difflab.samplers.consistency import consistency
from difflab.samplers.ddim import check_eta, ddim, ddim_invert, slerp
from difflab.samplers.ddpm import ddpm
from difflab.samplers.langevin import annealed_langevin, predictor_corrector
from difflab.samplers.loop import Callback, Generators, SamplerLoop, check_generator, randn
from difflab.samplers.ode import dpmpp_2m, euler, heun
from difflab.samplers.timesteps import SPACINGS, get_timesteps, is_respacing_string, space_timesteps
from difflab.samplers.unipc import unipc
from difflab.schedules import Schedule

SAMPLERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "langevin": annealed_langevin,
    "pc": predictor_corrector,
    "euler_a": euler_ancestral,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "unipc": unipc,
    "consistency": consistency,
}

# Measured on the mixture oracle against diffusers' counterparts (benchmarks/samplers.py):
# samplers whose last step lands on x0_hat do best at few steps when the last listed level is
# one stride above t = 0 ("trailing", as diffusers' multistep solvers space their steps): an
# evaluation at sigma_min ~ 0.01 is nearly wasted. Heun: uniform in t, as diffusers does, with
# its stiff-step guard (`heun`). DDIM/DDPM too: on the linear-schedule oracle "trailing" is
# better than "linspace" at 5 steps (5.7x / 7.2x the 2-D floor against 7.8x / 9.2x;
# benchmarks/spacing.py), and on the shipped cosine digits model at 50 steps the two give the
# same digits FD on the same noise (63.7 / 64.7 and 51.1 / 51.4 on two sets of 1,000).
# Ancestral chains need integer steps.
DEFAULT_SPACING = {  # measured on the mixture oracle against diffusers (benchmarks/samplers.py)
    "ddpm": "trailing",
    "ddim": "trailing",
    "pc": "linspace",
    "euler": "trailing",
    "heun": "linspace",  # with Karras's ladder it collapsed at low NFE on VP (see samplers/ode.py)
    "dpmpp_2m": "trailing",
    "euler_a": "trailing",
    "dpmpp_2m_sde": "trailing",
    "unipc": "trailing",
    "langevin": "geometric",
    "consistency": "trailing",  # the first level is T - 1: pure noise, as one-step generation needs
}

# Euler and DPM-Solver++(2M) on a schedule whose top noise level is extreme (cosine: sigma_max
# ~2e4, against ~157 for linear) take the ladders that come down from it gradually: a uniform
# ladder jumps from there to a few units in one step, which multiplies a trained eps-model's
# error at t = T - 1 by thousands (unclipped vectors blow up). On moderate tops "trailing" is
# the better ladder (at 5 NFE on the 2-D oracle 5.7x the floor against Karras's 9.9x).
STEEP_TOP_SPACING = {"euler": "karras", "dpmpp_2m": "geometric"}
STEEP_SIGMA_MAX = 1e3


def default_spacing(sampler: str, schedule: Schedule) -> str:
    """The spacing `sample` uses for `sampler` on `schedule` when none is given."""
    if sampler in STEEP_TOP_SPACING and schedule.sigma_at(schedule.T - 1).item() > STEEP_SIGMA_MAX:
        return STEEP_TOP_SPACING[sampler]
    return DEFAULT_SPACING[sampler]


# Names users know from other libraries -> (sampler, spacing it implies; None = the default)
SAMPLER_ALIASES = {
    "dpmpp_2m_karras": ("dpmpp_2m", "karras"),
    "dpm++_2m": ("dpmpp_2m", None),
    "dpm++_2m_karras": ("dpmpp_2m", "karras"),
    "euler_karras": ("euler", "karras"),
    "euler_ancestral": ("euler_a", None),
    "dpm++_2m_sde": ("dpmpp_2m_sde", None),
    "dpmpp_2m_sde_karras": ("dpmpp_2m_sde", "karras"),
    "heun_karras": ("heun", "karras"),
    "ddim_trailing": ("ddim", "trailing"),
}


# samplers with a noise share eta (0 = deterministic), which `sample(eta=...)` sets
ETA_SAMPLERS = ("ddim", "euler_a", "dpmpp_2m_sde")


def resolve_sampler(name: str, spacing: str | None = None) -> tuple[str, str | None]:
    """(sampler, spacing) for a sampler name or alias; an alias's spacing must not contradict
    an explicit `spacing`."""
    if name in SAMPLERS:
        return name, spacing
    if name not in SAMPLER_ALIASES:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join([*SAMPLERS, *SAMPLER_ALIASES])}")
    sampler, implied = SAMPLER_ALIASES[name]
    if spacing is not None and implied is not None and spacing != implied:
        raise ValueError(f"sampler {name!r} means spacing {implied!r}, but spacing {spacing!r} was given")
    return sampler, spacing if spacing is not None else implied


__all__ = [
    "SAMPLER_ALIASES",
    "DEFAULT_SPACING",
    "STEEP_TOP_SPACING",
    "ETA_SAMPLERS",
    "SAMPLERS",
    "SPACINGS",
    "SamplerLoop",
    "annealed_langevin",
    "check_generator",
    "consistency",
    "ddim",
    "ddim_invert",
    "ddpm",
    "default_spacing",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "euler",
    "euler_ancestral",
    "get_timesteps",
    "heun",
    "predictor_corrector",
    "randn",
    "resolve_sampler",
    "sample",
    "sampler_options",
    "sampling_plan",
    "slerp",
    "space_timesteps",
    "unipc",
]


def sample(
    denoiser: Denoiser,
    shape: Sequence[int],
    sampler: str = "ddim",
    steps: int | None = 50,
    eta: float | None = None,
    spacing: str | None = None,
    generator: Generators = None,
    progress: bool = True,
    callback: Callback | None = None,
    cond: dict | None = None,
    x_T: Tensor | None = None,
    *,
    rho: float = 7.0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **options,
) -> Tensor:
    """Draw `shape[0]` samples with the named sampler (one of `SAMPLERS`).

    `spacing` (default per sampler and schedule, `default_spacing`) is one of `SPACINGS` or an
    improved-diffusion respacing string ("ddim25", "10,15,20"), which fixes the number of steps
    itself (then pass steps=None or the same count). `eta` is the noise share of ddim (default
    0), euler_a and dpmpp_2m_sde (default 1): `ETA_SAMPLERS`. `generator` is a torch.Generator
    or a list of them, one per example, so an example does not depend on the batch size.
    `options` go to the sampler (ddpm: variance; heun: stiff_ratio; unipc: order, corrector;
    langevin: n_steps, step_size, denoise; pc: snr, n_corrector, variance)."""
    shape = tuple(shape)
    denoiser.check_shape(shape)
    generator = check_generator(generator, shape[0])
    sampler, timesteps, options = sampling_plan(denoiser.schedule, sampler, steps, eta, spacing, rho=rho, **options)
    if x_T is None:
        x_T = randn(shape, generator, dtype=dtype or torch.get_default_dtype(), device=device)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={shape}")
    return SAMPLERS[sampler](
        denoiser, x_T, timesteps, generator=generator, callback=callback, cond=cond, progress=progress, **options
    )


def sampling_plan(
    schedule: Schedule,
    sampler: str = "ddim",
    steps: int | None = 50,
    eta: float | None = None,
    spacing: str | None = None,
    *,
    rho: float = 7.0,
    **options,
) -> tuple[str, Tensor, dict]:
    """What `sample` runs, checked without running it: (sampler, timesteps, its options) for a
    sampler name or alias, steps, eta (None: the sampler's own), spacing and sampler options on
    `schedule`. Raises ValueError for any that does not fit (eta with another sampler, steps
    beyond T, ...), so a recipe or a model folder can be checked before any work."""
    sampler, spacing = resolve_sampler(sampler, spacing)
    if eta is not None:
        eta = check_eta(eta)
        if sampler in ETA_SAMPLERS:
            options["eta"] = eta
        elif eta != 0.0:
            raise ValueError(
                f"eta applies only to sampler 'ddim' and the stochastic samplers {', '.join(ETA_SAMPLERS[1:])}, "
                f"got eta={eta} with sampler {sampler!r}"
            )
    spacing = default_spacing(sampler, schedule) if spacing is None else spacing
    if steps is None and not (isinstance(spacing, str) and is_respacing_string(spacing)):
        raise ValueError(f"steps=None is allowed only with a respacing string, not with spacing {spacing!r}")
    check_options(sampler, options)
    return sampler, get_timesteps(schedule, steps, spacing, rho=rho), options


_COMMON = {"denoiser", "x_T", "timesteps", "generator", "callback", "cond", "progress"}


def sampler_options(sampler: str) -> list[str]:
    """The extra keyword options a sampler takes."""
    params = inspect.signature(SAMPLERS[sampler]).parameters
    return [name for name in params if name not in _COMMON]


def check_options(sampler: str, options: dict) -> None:
    allowed = sampler_options(sampler)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"sampler {sampler!r} takes no option(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}"
        )
