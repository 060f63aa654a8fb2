"""Which steps of the chain a sampler visits: always a strictly *descending* list of original
indices, whose first entry is the noisiest kept step (where x_T ~ N(0, I) is placed) and
whose last step lands on clean data.

Samplers read the previous timestep from this list (never as t - T // n: diffusers #9261,
#11347), and the step after the last entry goes to t = -1 (alpha_bar = 1): no residual noise.

Spacings for `steps` = n out of T:
  - "linspace": n points evenly spread over [0, T-1], rounded; starts at T-1 and ends at 0.
  - "trailing": stride T / n anchored at the noisy end: T-1, T-1-T/n, ... (rounded); starts at T-1.
  - "leading": stride T // n anchored at the clean end: (n-1)(T//n), ..., T//n, 0, i.e. diffusers'
    "leading" with steps_offset = 0. Its noisiest kept step is (n-1)(T//n) <= T-1, so sampling
    starts there from N(0, I) although q(x_t) is not yet pure noise; the flaw Lin et al. 2023
    (Table 2) point out. Kept for compatibility; prefer "linspace" or "trailing".
  - "karras": sigma spacing of Karras et al. 2022 (rho = 7) between the schedule's smallest and
    largest sigma, as fractional indices (for samplers that accept them).
  - "geometric": log-uniform sigmas between the same ends (NCSN's noise ladder), fractional.
  - improved-diffusion respacing strings: "10,15,20" (that many evenly spaced steps in each of
    three equal sections of the chain) or "ddimS" (the stride giving exactly S steps, from 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.schedules import MAX_T, Schedule, geometric_sigmas, karras_sigmas

SPACINGS = ("linspace", "trailing", "leading", "karras", "geometric")


def is_respacing_string(spacing: str) -> bool:
    return spacing.startswith("ddim") or all(part.strip().isdigit() for part in spacing.split(","))


def space_timesteps(T: int, spec: str) -> list[int]:
    """improved-diffusion's respacing: "ddimS" or comma-separated counts per equal section.

    Returns the kept indices, ascending."""
    if spec.startswith("ddim"):
        count = spec[len("ddim") :]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"'ddimS' needs a positive integer S, got {spec!r}")
        n = int(count)
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise ValueError(f"no integer stride gives exactly {n} steps out of T={T} for {spec!r}; use e.g. {n!r} instead")
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"respacing string must be 'ddimS' or comma-separated integers, got {spec!r}") from None
    size, extra = divmod(T, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise ValueError(f"section {i} of {spec!r} has {section} steps; its count must lie in [1, {section}]")
        stride = 1.0 if count == 1 else (section - 1) / (count - 1)
        kept += [start + int(math.floor(j * stride + 0.5)) for j in range(count)]
        start += section
    return kept


def get_timesteps(
    schedule: Schedule, steps: int | None = None, spacing: str = "linspace", *, rho: float = 7.0
) -> Tensor:
    """Descending timesteps for a sampler: int64 for discrete spacings, float64 (fractional
    indices from `schedule.sigma_to_t`) for "karras" and "geometric".

    `steps` is required for the named spacings; a respacing string carries its own count
    (`steps` may then be None or must agree with it)."""
    T = schedule.T
    if not isinstance(spacing, str):
        raise ValueError(f"spacing must be a string, got {spacing!r}")
    if spacing not in SPACINGS:
        if not is_respacing_string(spacing):
            raise ValueError(
                f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}, 'ddimS' or counts like '10,15,20'"
            )
        kept = space_timesteps(T, spacing)
        if steps is not None and steps != len(kept):
            raise ValueError(f"spacing {spacing!r} keeps {len(kept)} steps but steps={steps}; pass steps=None")
        return torch.tensor(sorted(kept, reverse=True), dtype=torch.int64)
    fractional = spacing in ("karras", "geometric")  # levels between grid points: they may outnumber T
    n = check_steps(steps, MAX_T, "a limit on sampler steps") if fractional else check_steps(steps, T)
    if spacing == "linspace":
        ts = [T - 1] if n == 1 else [int(math.floor(i * (T - 1) / (n - 1) + 0.5)) for i in range(n)]
    elif spacing == "trailing":
        ts = [int(math.floor(T - i * T / n + 0.5)) - 1 for i in range(n)]
    elif spacing == "leading":
        ts = [i * (T // n) for i in range(n)]
    else:
        return sigma_spaced(schedule, n, spacing, rho)
    return torch.tensor(sorted(set(ts), reverse=True), dtype=torch.int64)


def check_steps(steps: int | None, T: int, limit: str = "the schedule's T") -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] ({limit}), got {steps!r}")
    return steps


def sigma_spaced(schedule: Schedule, n: int, spacing: str, rho: float = 7.0) -> Tensor:
    """Fractional timesteps (descending) whose VE noise levels follow the Karras or geometric
    ladder between the schedule's smallest and largest sigma; n may exceed T (the levels are
    fractional), as consistency training's growing ladders need."""
    sigmas = schedule.sigmas
    lo, hi = sigmas[0].item(), sigmas[-1].item()
    if not math.isfinite(hi):
        raise ValueError(
            f"spacing {spacing!r} needs a finite largest sigma; this schedule ({schedule.name}) has zero terminal "
            "SNR: use 'linspace' or 'trailing' with ddim/ddpm"
        )
    if n == 1:
        return torch.tensor([float(schedule.T - 1)], dtype=torch.float64)
    if spacing == "karras":
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        ladder = karras_sigmas(lo, hi, n, rho)
    else:
        ladder = geometric_sigmas(lo, hi, n)
    t = schedule.sigma_to_t(ladder.flip(0)).clamp(0, schedule.T - 1)
    t[0], t[-1] = schedule.T - 1, 0.0  # the ends exactly, whatever the round-off
    return t
