"""One evaluation of a digits diffusion model, shared by `difflab eval`, `difflab demo` and
benchmarks/digits.py: sample, judge with the shipped digits classifier, compare with the
real-data floor at the same sample count."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from difflab.denoiser import Denoiser


def digits_reference(size: int):
    """The shipped classifier and the real digits it is judged against (test and train)."""
    from difflab.data.digits import DigitsDataset
    from difflab.eval.digits_classifier import load_digits_classifier

    return (
        load_digits_classifier(size),
        DigitsDataset("test", size=size).images,
        DigitsDataset("train", size=size).images,
    )


def sample_batched(
    denoiser: Denoiser,
    n: int,
    sampler: str,
    steps: int,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 500,
    cond: dict | None = None,
    progress: bool = False,
    decode=None,
) -> Tensor:
    """`n` samples in batches, each example from its own generator (seed + index), so the
    images do not depend on the batch size. `decode` (a latent pipeline's `load_decoder`)
    turns each batch of latents into images."""
    from difflab.samplers import sample

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        batch_cond = None if cond is None else {k: v[start : start + len(idx)] for k, v in cond.items()}
        shape = (len(idx), *denoiser.sample_shape)
        x = sample(denoiser, shape, sampler, steps, eta, generator=gens, progress=progress, cond=batch_cond)
        out.append(x if decode is None else decode(x))
    return torch.cat(out)


@torch.no_grad()
def evaluate_digits(
    denoiser: Denoiser,
    sampler: str = "ddim",
    steps: int = 50,
    n: int = 300,
    seed: int = 0,
    eta: float = 0.0,
    cond: dict | None = None,
    progress: bool = False,
    decode=None,
) -> tuple[dict, Tensor]:
    """Metrics of `n` samples against the 297 real test digits: digits FD, confident share,
    class histogram; plus the floors: the FD of `n` real *train* digits against the same
    test set (what a perfect model would score at this count) and of two test halves.
    `decode` turns a latent model's samples into images (see `load_decoder`)."""
    from difflab.eval.frechet import frechet_distance
    from difflab.eval.metrics import classifier_outputs, digits_metrics, real_vs_real_floor

    start = time.perf_counter()
    samples = sample_batched(denoiser, n, sampler, steps, seed, eta, cond=cond, progress=progress, decode=decode)
    classifier, test, train = digits_reference(samples.shape[-1])
    seconds = time.perf_counter() - start
    samples = samples.clamp(-1.0, 1.0)  # judged as they would be saved: pixels in [-1, 1]
    metrics = digits_metrics(samples, classifier, test)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(n, len(train))]
    train_feats, _ = classifier_outputs(classifier, train[pick])
    test_feats, _ = classifier_outputs(classifier, test)
    metrics.update(
        sampler=sampler,
        steps=steps,
        eta=eta,
        seed=seed,
        floor_fd_same_count=frechet_distance(train_feats, test_feats),
        floor_fd_test_halves=real_vs_real_floor(test, classifier, seed=seed),
        sampling_seconds=seconds,
    )
    return metrics, samples


def format_metrics(m: dict) -> str:
    hist = " ".join(f"{s * 100:.0f}" for s in m["class_histogram"]["shares"])
    return (
        f"{m['sampler']}-{m['steps']}: digits FD {m['digits_fd']:.1f} "
        f"(floor {m['floor_fd_same_count']:.1f} at {m['num_samples']} samples), "
        f"confident {m['confident_share'] * 100:.1f}%, class shares % [{hist}] "
        f"(max deviation {m['max_class_deviation_pp']:.1f} pp), {m['sampling_seconds']:.1f}s"
    )
