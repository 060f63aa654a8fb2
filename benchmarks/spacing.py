"""DDIM and DDPM at few steps by timestep spacing, next to diffusers, on the mixture oracle.

Why: at NFE 5 difflab's default DDIM/DDPM ("linspace") is behind diffusers' schedulers in
benchmarks/samplers.py. This measures each spacing (linspace, trailing, leading, karras,
geometric; DDPM only the integer ones) with the exact denoiser of the 2-D and 64-D mixtures of that benchmark (linear
schedule, T = 1000): SW2 / noise floor, mean of 3 draws, the same draws for every column.

    python benchmarks/spacing.py            # about 2 minutes on one core

Writes benchmarks/results/spacing.json.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from difflab.denoiser import MixtureDenoiser
from difflab.samplers import sample
from difflab.schedules import Schedule
from samplers import MixtureEps, SlicedW2, diffusers_sample, mixture_2d, mixture_64d

RESULTS = Path(__file__).parent / "results"
SPACINGS = ("linspace", "trailing", "leading", "karras", "geometric")
NFES = (5, 10, 20)
DRAWS = 3
DRAW_SIZE = {2: 10_000, 64: 1000}  # samples per draw, as benchmarks/samplers.py


def draw(mixture, den, name: str, nfe: int, d: int, spacing: str | None) -> torch.Tensor:
    """Draw d (its own x_T and generator) of `name` at `nfe` steps; spacing None: diffusers."""
    n = DRAW_SIZE[mixture.D]
    x_T = torch.randn(n, mixture.D, generator=torch.Generator().manual_seed(7 + d), dtype=torch.float64)
    gen = torch.Generator().manual_seed(11 + d)
    if spacing is None:
        return diffusers_sample(name, MixtureEps(mixture), x_T, nfe, gen)
    return sample(den, (n, mixture.D), name, steps=nfe, x_T=x_T, progress=False, generator=gen, spacing=spacing)


def measure(mixture, n_ref: int) -> dict:
    """{sampler: {nfe: {spacing or "diffusers": SW2 / floor}}} for one mixture."""
    den = MixtureDenoiser(mixture, Schedule.make("linear", T=1000))
    g = torch.Generator().manual_seed(123)
    metric = SlicedW2(mixture.sample(n_ref, g), DRAW_SIZE[mixture.D], 256)
    floor = sum(metric(mixture.sample(DRAW_SIZE[mixture.D], g)) for _ in range(10)) / 10
    rows: dict = {}
    for name in ("ddim", "ddpm"):
        for nfe in NFES:
            row = {}
            # ancestral DDPM steps need integer timesteps: no karras/geometric ladder for it
            spacings = SPACINGS if name == "ddim" else SPACINGS[:3]
            for spacing in (*spacings, None):
                sw2 = sum(metric(draw(mixture, den, name, nfe, d, spacing)) for d in range(DRAWS)) / DRAWS
                row[spacing or "diffusers"] = sw2 / floor
            rows.setdefault(name, {})[str(nfe)] = row
            print(f"D={mixture.D}", name, nfe, "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    out = {"machine": platform.machine(), "draws": DRAWS, "schedule": "linear, T = 1000", "results": {}}
    out["results"]["2d"] = measure(mixture_2d(), 200_000)
    out["results"]["64d"] = measure(mixture_64d(), 50_000)
    path = RESULTS / "spacing.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
