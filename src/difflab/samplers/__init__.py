"""Samplers: stateless functions `(denoiser, x_T, timesteps, *, generator, callback, cond,
progress, **options) -> x_0`, and `sample(...)`, the one entry point that picks the
timesteps, draws x_T and runs a sampler by name.

x_T is always in VP coordinates (x_T ~ N(0, I) at the first listed timestep) and every
sampler returns clean data (its last step lands on x0_hat). `steps` counts sampler steps,
not network evaluations: Heun costs 2 steps - 1, PC steps * (1 + n_corrector), Langevin
steps * n_steps + 1 NFE.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.consistency import consistency
from difflab.samplers.ddim import check_eta, ddim, ddim_invert, slerp
from difflab.samplers.ddpm import ddpm
from difflab.samplers.langevin import annealed_langevin, predictor_corrector
from difflab.samplers.loop import Callback, Generators, SamplerLoop, check_generator, randn
from difflab.samplers.ode import dpmpp_2m, euler, heun
from difflab.samplers.timesteps import SPACINGS, get_timesteps, is_respacing_string, space_timesteps
from difflab.schedules import Schedule

SAMPLERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "langevin": annealed_langevin,
    "pc": predictor_corrector,
    "consistency": consistency,
}

# Euler/Heun: Karras et al.'s spacing; DPM-Solver++ steps uniformly in log-SNR (= geometric
# sigmas), as its authors recommend, which also measured best at 10-20 NFE in our benchmark;
# ancestral chains need integer steps.
DEFAULT_SPACING = {
    "ddpm": "linspace",
    "ddim": "linspace",
    "pc": "linspace",
    "euler": "karras",
    "heun": "karras",
    "dpmpp_2m": "geometric",
    "langevin": "geometric",
    "consistency": "trailing",  # the first level is T - 1: pure noise, as one-step generation needs
}

# Names users know from other libraries -> (sampler, spacing it implies; None = the default)
SAMPLER_ALIASES = {
    "dpmpp_2m_karras": ("dpmpp_2m", "karras"),
    "dpm++_2m": ("dpmpp_2m", None),
    "dpm++_2m_karras": ("dpmpp_2m", "karras"),
    "euler_karras": ("euler", "karras"),
    "heun_karras": ("heun", "karras"),
    "ddim_trailing": ("ddim", "trailing"),
}


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
    "SAMPLERS",
    "SPACINGS",
    "SamplerLoop",
    "annealed_langevin",
    "check_generator",
    "consistency",
    "ddim",
    "ddim_invert",
    "ddpm",
    "dpmpp_2m",
    "euler",
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
]


def sample(
    denoiser: Denoiser,
    shape: Sequence[int],
    sampler: str = "ddim",
    steps: int | None = 50,
    eta: float = 0.0,
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

    `spacing` (default per sampler, `DEFAULT_SPACING`: karras for euler/heun, geometric for
    dpmpp_2m and langevin, linspace otherwise) is one of `SPACINGS` or an improved-diffusion respacing string
    ("ddim25", "10,15,20"), which fixes the number of steps itself (then pass steps=None or
    the same count). `eta` is DDIM's; `generator` is a torch.Generator or a list of them, one
    per example, so an example does not depend on the batch size. `options` go to the sampler
    (ddpm: variance; langevin: n_steps, step_size, denoise; pc: snr, n_corrector, variance)."""
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
    eta: float = 0.0,
    spacing: str | None = None,
    *,
    rho: float = 7.0,
    **options,
) -> tuple[str, Tensor, dict]:
    """What `sample` runs, checked without running it: (sampler, timesteps, its options) for a
    sampler name or alias, steps, DDIM's eta, spacing and sampler options on `schedule`. Raises
    ValueError for any that does not fit (eta with another sampler, steps beyond T, ...), so a
    recipe or a model folder can be checked before any work."""
    sampler, spacing = resolve_sampler(sampler, spacing)
    eta = check_eta(eta)
    if eta != 0.0:
        if sampler != "ddim":
            raise ValueError(f"eta applies only to sampler 'ddim', got eta={eta} with sampler {sampler!r}")
        options["eta"] = eta
    spacing = DEFAULT_SPACING[sampler] if spacing is None else spacing
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
