"""Sample-quality numbers for digits models and the data NLL of any denoiser.

Why these: "digits FD" (Frechet distance in our digits classifier's feature space) measures
fidelity and diversity together; the confident share and class histogram say *how* a model fails
(blurry, unreadable digits lower confidence; mode collapse skews the histogram). FD has no
absolute scale and a finite-sample bias, so ``real_vs_real_floor`` gives the value two halves of
real data reach: the floor a perfect model would sit near.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.eval.digits_classifier import DigitsClassifier
from difflab.eval.frechet import frechet_distance

CONFIDENCE_THRESHOLD = 0.9
MAX_ABS_PIXEL = 8.0  # far beyond any plausible [-1, 1] sample: larger values mean unscaled pixels


def _check_images(images: Tensor, classifier: DigitsClassifier, name: str) -> Tensor:
    """Images for the classifier: (N >= 2, 1, size, size), finite floats roughly in [-1, 1],
    clamped to [-1, 1] as saving them as pictures would."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    size = classifier.size
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, size, size):
        raise ValueError(f"{name} must have shape (N, 1, {size}, {size}) got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images for a Frechet distance, got {images.shape[0]}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point scaled to [-1, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or inf values; only finite values are allowed")
    peak = float(images.abs().max())
    if peak > MAX_ABS_PIXEL:
        raise ValueError(
            f"{name} has values up to {peak:.3g} in magnitude; images must be scaled to [-1, 1] "
            "(convert 0..255 pixels with x / 127.5 - 1)"
        )
    return images.clamp(-1.0, 1.0)


@torch.no_grad()
def classifier_outputs(classifier: DigitsClassifier, images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """(features (N, feature_dim), softmax probabilities (N, num_classes)) in eval mode, batched."""
    was_training = classifier.training
    classifier.eval()
    device = classifier.feature.weight.device
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = classifier.features(images[i : i + batch_size].to(device))
        feats.append(f.cpu())
        probs.append(classifier.classify(f).softmax(1).cpu())
    classifier.train(was_training)
    return torch.cat(feats), torch.cat(probs)


def digits_metrics(
    samples: Tensor, classifier: DigitsClassifier, real_test_images: Tensor, batch_size: int = 512
) -> dict:
    """Quality of generated digits judged by ``classifier``.

    Returns "digits_fd" (FD between the samples' and the real images' features), "confident_share"
    (share of samples whose top softmax probability exceeds 0.9), "class_histogram" ({"counts",
    "shares"}: per-class lists of arg-max predictions), "max_class_deviation_pp" (largest
    |share - 1/num_classes| in percentage points) and "num_samples".
    """
    samples = _check_images(samples, classifier, "samples")
    real = _check_images(real_test_images, classifier, "real_test_images")
    sample_feats, probs = classifier_outputs(classifier, samples, batch_size)
    real_feats, _ = classifier_outputs(classifier, real, batch_size)
    num_classes = probs.shape[1]
    counts = torch.bincount(probs.argmax(1), minlength=num_classes)
    shares = counts.double() / len(samples)
    return {
        "digits_fd": frechet_distance(sample_feats, real_feats),
        "confident_share": float((probs.max(1).values > CONFIDENCE_THRESHOLD).double().mean()),
        "class_histogram": {"counts": counts.tolist(), "shares": shares.tolist()},
        "max_class_deviation_pp": float((shares - 1.0 / num_classes).abs().max() * 100.0),
        "num_samples": len(samples),
    }


def real_vs_real_floor(
    images: Tensor, classifier: DigitsClassifier, seed: int = 0, num_splits: int = 10, batch_size: int = 512
) -> float:
    """FD between two random halves of real ``images``, averaged over ``num_splits`` splits drawn
    with ``seed`` (one split alone is noisy: on the 297 test digits at 16x16 single splits give
    86..309 around a mean of ~166).

    A model whose samples match the data can do no better than about this with as many samples as
    a half holds. FD shrinks steeply with more samples (halves of all 1,797 digits give ~26), so
    compare at similar counts.
    """
    images = _check_images(images, classifier, "images")
    if len(images) < 4:
        raise ValueError(f"images needs at least 4 images to split into two halves of 2, got {len(images)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    feats, _ = classifier_outputs(classifier, images, batch_size)
    generator = torch.Generator().manual_seed(seed)
    half = len(images) // 2
    total = 0.0
    for _ in range(num_splits):
        perm = torch.randperm(len(images), generator=generator)
        total += frechet_distance(feats[perm[:half]], feats[perm[half:]])
    return total / num_splits


def nll_bpd(
    denoiser, images: Tensor, batch_size: int = 64, cond: dict | None = None, seed: int = 0, progress: bool = False
) -> float:
    """Mean negative log-likelihood bound of ``images`` in bits/dim (``losses.nll_bits_per_dim``:
    all T terms per batch, so this costs T network calls per batch).

    ``cond`` values that are tensors with one row per image are sliced along with the batches;
    ``seed`` fixes the forward-process noise so repeated evaluations agree.
    """
    from difflab.losses import nll_bits_per_dim

    if not isinstance(images, Tensor) or images.ndim < 2 or images.shape[0] < 1:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N >= 1, ...), got {got}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = images.shape[0]
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, n, batch_size):
        batch_cond = None
        if cond is not None:
            batch_cond = {
                k: v[i : i + batch_size] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n else v
                for k, v in cond.items()
            }
        bpd = nll_bits_per_dim(denoiser, images[i : i + batch_size], batch_cond, generator, progress)["total"]
        total += float(bpd.double().sum())
    return total / n
