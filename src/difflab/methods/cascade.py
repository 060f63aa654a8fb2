"""Cascaded diffusion (Ho et al. 2021): the math of a super-resolution stage's condition,
shared by its training task and the cascade pipeline, testable without training anything.

A super-resolution stage models p(x | z), x at the high resolution and z the low-resolution
image it refines. z is given to the network resized up to x's size and concatenated to x_t
(``cond["concat"]``). Conditioning augmentation corrupts z so that the stage does not learn to
trust every pixel of it (the base model's samples are never as clean as real images):

- level s in [0, 1] of an augmentation schedule of T steps: s = 0 is the clean z, s = 1 the
  last step (pure noise); s is the schedule's fractional timestep s T - 1, so any s is allowed
  and s T an integer is a step of the chain. z_s = sqrt(a(s)) z + sqrt(1 - a(s)) eps, i.e.
  q(z_s | z), and s itself is given to the network (``cond["aug_level"]``), drawn per example
  during training and a setting at sampling time.
- non-truncated ("noise"): at sampling time the previous stage runs to the end and its sample
  z_0 is noised to z_s ~ q(z_s | z_0) on the stage's augmentation schedule.
- truncated ("truncated"): the previous stage's reverse chain is stopped at step s and its
  state z_s feeds the stage, which saves the previous stage's last steps. The augmentation
  schedule is then the previous stage's own schedule, and s must be one of its steps. Training
  is the same in both variants: z_s ~ q(z_s | z_low) of the real image (the paper trains the
  truncated stage on the forward marginal, the distribution the stopped chain approximates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.data.resize import UPSAMPLE_MODES, upsample
from difflab.schedules import Schedule, broadcast

AUGMENTATIONS = ("none", "noise", "truncated")
TRUNCATABLE_SAMPLERS = ("ddim", "ddpm")  # samplers whose chain state after each step is a point of q(x_t)
AUG_LEVEL = "aug_level"  # the cond key of the augmentation level
CONCAT = "concat"  # the cond key of the upsampled low-resolution condition
GRID_TOLERANCE = 1e-6
SNAP = 1e-4  # a level this close (in steps) to a step of its schedule is that step


def check_level(s, name: str = "aug_level") -> float:
    """A level s as a float in [0, 1], or a ValueError naming it."""
    if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= s <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (0 = the clean condition), got {s!r}")
    return float(s)


def check_levels(levels: Sequence[float], name: str = "aug_levels") -> tuple[float, float]:
    """A range [low, high] of levels with 0 <= low <= high <= 1."""
    if not isinstance(levels, list | tuple) or len(levels) != 2:
        raise ValueError(f"{name} must be [low, high] with 0 <= low <= high <= 1, got {levels!r}")
    low, high = (check_level(v, name) for v in levels)
    if low > high:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(levels)}")
    return low, high


def level_timestep(s: Tensor | float, T: int) -> Tensor:
    """The (fractional) timestep index s T - 1 of level s: -1 (clean) at s = 0, T - 1 at s = 1.
    Within 1e-4 of a step it is that step: levels travel as float32 (k / T is not exact), and
    a truncated stage must noise at exactly the step its previous chain stops at."""
    k = torch.as_tensor(s, dtype=torch.float64) * T
    step = k.round()
    return torch.where((k - step).abs() < SNAP, step, k) - 1.0


def on_grid(s: float, T: int) -> bool:
    """Whether s T is an integer: level s is a step the chain visits."""
    return abs(s * T - round(s * T)) <= GRID_TOLERANCE * max(1, T)


def grid_step(s: float, T: int, name: str = "aug_level") -> int:
    """The integer timestep of a level on the grid of T steps (-1 for s = 0), or a clear error."""
    s = check_level(s, name)
    if not on_grid(s, T):
        raise ValueError(
            f"{name} = {s} is not a step of the previous stage's chain (T = {T}): truncated conditioning "
            f"stops the chain at a step, so s T must be an integer (e.g. {round(s * T) / T})"
        )
    return round(s * T) - 1


def level_alpha_bar(schedule: Schedule, s: Tensor | float) -> Tensor:
    """alpha_bar (float64) of level s on `schedule`: 1 at s = 0."""
    return schedule.alpha_bar_at(level_timestep(s, schedule.T))


def noised_condition(z: Tensor, s: Tensor | float, schedule: Schedule, noise: Tensor) -> Tensor:
    """q(z_s | z): sqrt(a) z + sqrt(1 - a) noise with a = alpha_bar of level s (one level, or one
    per example). s = 0 returns z exactly (the coefficients are 1 and 0)."""
    if noise.shape != z.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but the condition has {tuple(z.shape)}")
    a = level_alpha_bar(schedule, torch.as_tensor(s).detach().cpu())
    if a.ndim == 0:
        a = a.expand(z.shape[0])
    if a.shape != (z.shape[0],):
        raise ValueError(f"give one level or one per example ({z.shape[0]}), got shape {tuple(a.shape)}")
    a = a.to(z.device)
    return broadcast(a.sqrt().to(z.dtype), z) * z + broadcast((1.0 - a).sqrt().to(z.dtype), z) * noise


def draw_levels(n: int, low: float, high: float, generator: torch.Generator, grid_T: int | None = None) -> Tensor:
    """n levels uniform in [low, high] (float32, on the generator's device). With `grid_T`, uniform
    over the steps k / grid_T in that range (a truncated stage learns exactly the levels at which
    the previous chain can stop). low = high draws nothing from the generator."""
    low, high = check_levels([low, high])
    device = generator.device
    if grid_T is None:
        if low == high:
            return torch.full((n,), low, device=device)
        return low + (high - low) * torch.rand(n, generator=generator, device=device)
    k_low, k_high = math.ceil(low * grid_T - GRID_TOLERANCE), math.floor(high * grid_T + GRID_TOLERANCE)
    if k_low > k_high:
        raise ValueError(f"aug_levels {[low, high]} hold no step of a chain of {grid_T} steps")
    if k_low == k_high:
        return torch.full((n,), k_low / grid_T, device=device)
    k = torch.randint(k_low, k_high + 1, (n,), generator=generator, device=device)
    return k.to(torch.float64).div(grid_T).float()


def superres_condition(z: Tensor, s: Tensor | float, size: int, mode: str = "bicubic") -> dict:
    """The network's cond entries for low-resolution images z at level s: z resized up to `size`
    (``"concat"``) and the levels (``"aug_level"``, one float per example)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {mode!r}; allowed: {', '.join(UPSAMPLE_MODES)}")
    levels = torch.as_tensor(s, dtype=torch.float32, device=z.device)
    levels = levels.expand(z.shape[0]).clone() if levels.ndim == 0 else levels
    return {CONCAT: upsample(z, size, mode), AUG_LEVEL: levels}


# ---------------------------------------------------------------- a chain stopped at step s
class _Stopped(Exception):
    """Raised by the callback of a stopped chain once it holds the state it stops at."""


def stopped_timesteps(timesteps: Tensor, stop: int) -> Tensor:
    """A sampler's descending timesteps cut at step `stop`: those above it, then `stop` itself."""
    kept = timesteps[timesteps > stop]
    return torch.cat([kept, torch.tensor([stop], dtype=timesteps.dtype)])


def sample_until(
    denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    stop: int,
    sampler: str = "ddim",
    *,
    generator=None,
    cond: dict | None = None,
    progress: bool = False,
    **options,
) -> Tensor:
    """The state of a reverse chain at step `stop` (its timestep index; -1 runs the chain to
    clean data as the sampler does). The chain takes the sampler's own steps above `stop` and a
    last step onto it, so it is the previous stage's chain, stopped: nothing is computed below."""
    from difflab.samplers import SAMPLERS

    run = SAMPLERS[sampler]
    if stop < 0:
        return run(denoiser, x_T, timesteps, generator=generator, cond=cond, progress=progress, **options)
    if sampler not in TRUNCATABLE_SAMPLERS:
        raise ValueError(
            f"a chain can be stopped at a step with the samplers {', '.join(TRUNCATABLE_SAMPLERS)}, not {sampler!r}"
        )
    ts = stopped_timesteps(timesteps.cpu(), stop)
    if len(ts) == 1:  # stopped where it starts: pure noise at the top step
        return x_T
    held: list[Tensor] = []

    def hold(i, t, x, pred):
        if i == len(ts) - 2:  # the step that lands on `stop`
            held.append(x)
            raise _Stopped

    try:
        run(denoiser, x_T, ts, generator=generator, cond=cond, progress=progress, callback=hold, **options)
    except _Stopped:
        return held[0]
    raise RuntimeError(f"the {sampler} chain ended without reporting step {stop}")
