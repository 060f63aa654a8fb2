"""One evaluation of a digits diffusion model, shared by `difflab eval`, `difflab demo` and
benchmarks/digits.py: sample, judge with the shipped digits classifier, compare with the
real-data floor at the same sample count."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.pipelines.sampling import sample_batched


def digits_reference(size: int):
    """The shipped classifier and the real digits it is judged against (test and train)."""
    from difflab.data.digits import DigitsDataset
    from difflab.eval.digits_classifier import load_digits_classifier

    return (
        load_digits_classifier(size),
        DigitsDataset("test", size=size).images,
        DigitsDataset("train", size=size).images,
    )


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
    spacing: str | None = None,
) -> tuple[dict, Tensor]:
    """Metrics of `n` samples against the 297 real test digits: digits FD, confident share,
    class histogram; plus the floors: the FD of `n` real *train* digits against the same
    test set (what a perfect model would score at this count) and of two test halves.
    `decode` turns a latent model's samples into images (see `load_decoder`)."""
    from difflab.eval.frechet import frechet_distance
    from difflab.eval.metrics import classifier_outputs, digits_metrics, real_vs_real_floor

    start = time.perf_counter()
    samples = sample_batched(
        denoiser, n, sampler, steps, seed, eta, cond=cond, progress=progress, decode=decode, spacing=spacing
    )
    seconds = time.perf_counter() - start  # sampling only: the judge's loading is not the model's time
    classifier, test, train = digits_reference(samples.shape[-1])
    samples = samples.clamp(-1.0, 1.0)  # judged as they would be saved: pixels in [-1, 1]
    metrics = digits_metrics(samples, classifier, test)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(n, len(train))]
    train_feats, _ = classifier_outputs(classifier, train[pick])
    test_feats, _ = classifier_outputs(classifier, test)
    metrics.update(
        sampler=sampler,
        steps=steps,
        spacing=spacing,
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
