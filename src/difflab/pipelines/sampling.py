"""Many samples in batches, each from its own seed, with progress a person can follow."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from difflab.denoiser import Denoiser, device_of
from difflab.seeds import derive_seed

MAX_SEED = 2**63 - 1


def sample_seeds(seed: int, n: int) -> list[int]:
    """The per-sample seeds of a run seeded with `seed`: sample i's noise comes from its own
    generator, so a sample does not depend on the batch size or on n. Each is a hash of
    (seed, i), so the samples of two seeds never share noise (seed + i would: sample i + 1 of
    seed 0 would be sample i of seed 1)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    return [derive_seed(seed, i) for i in range(n)]


def sample_batched(
    denoiser: Denoiser,
    n: int,
    sampler: str = "ddim",
    steps: int | None = 50,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 500,
    cond: dict | None = None,
    progress: bool = False,
    decode: Callable[[Tensor], Tensor] | None = None,
    spacing: str | None = None,
    generators: list[torch.Generator] | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> Tensor:
    """`n` samples (float32, on the CPU) in batches of `batch_size` on the denoiser's device.
    Sample i comes from generator i (default: seeded with `sample_seeds(seed, n)`); `cond`
    entries are sliced along with the batch; `decode` (a latent model's decoder) turns each
    batch of latents into images. With `progress`, a bar on a terminal, plain lines otherwise.
    `callback(done_steps, total_steps)` runs after every sampler step of every batch (total =
    steps per batch x batches), so a caller can show progress; an exception it raises stops
    sampling there (how `difflab serve` cancels a job)."""
    from difflab.samplers import sample, sampling_plan

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of samples) must be an integer >= 1, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if generators is None:
        generators = [torch.Generator().manual_seed(s) for s in sample_seeds(seed, n)]
    elif len(generators) != n:
        raise ValueError(f"got {len(generators)} generators for {n} samples")
    device = device_of(denoiser)
    terminal = sys.stderr.isatty()
    out, started, batches = [], time.perf_counter(), range(0, n, batch_size)
    per_batch = 0 if callback is None else len(sampling_plan(denoiser.schedule, sampler, steps, eta, spacing)[1])
    for k, start in enumerate(batches):
        stop = min(n, start + batch_size)
        batch_cond = None if cond is None else {key: v[start:stop] for key, v in cond.items()}
        step_callback = None
        if callback is not None:  # the sampler's (i, t, x, pred) -> (done, total) over all batches

            def step_callback(i, t, x, pred, done=k * per_batch):
                callback(done + i + 1, per_batch * len(batches))

        x = sample(
            denoiser, (stop - start, *denoiser.sample_shape), sampler, steps, eta, spacing,
            generator=generators[start:stop], progress=progress and terminal, cond=batch_cond, device=device,
            callback=step_callback,
        )  # fmt: skip
        x = x if decode is None else decode(x)
        out.append(x.float().cpu())
        if progress and not terminal:
            seconds = time.perf_counter() - started
            print(f"sampled {stop}/{n} ({sampler}, batch {k + 1}/{len(batches)}, {seconds:.1f} s)", flush=True)
    return torch.cat(out)
