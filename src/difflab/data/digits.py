"""The UCI 8x8 handwritten digits as a small, offline image data set.

Why: 1,797 tiny grey images (57 KB, `digits.csv.gz` beside this file, see DIGITS-NOTICE.md)
ship inside difflab, so training, samplers and tests have a real image set without any
download or extra dependency. The images are resized once (bilinear, antialiased) and
cached in memory per size.

Split (fixed forever, independent of any option): stratified by class with a fixed seed
(``SPLIT_SEED``); each class gives round-to-total share of 297/1,797 of its images to test, so
test has 297 images (29 or 30 per class) and train 1,500 (145..153 per class). ``split="all"``
gives all 1,797 in their original order.

Pixels: raw values 0..16 map linearly to [-1, 1] (0 -> -1, 16 -> 1); the background is exactly
-1 and stays -1 after resizing.
"""

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from difflab.data.seeding import derive_seed

DATA_FILE = Path(__file__).with_name("digits.csv.gz")
SIZES = (8, 16, 32)
SPLITS = ("train", "test", "all")
NUM_IMAGES = 1797
NUM_TEST = 297
NUM_TRAIN = NUM_IMAGES - NUM_TEST  # 1,500
SPLIT_SEED = 0
CLASS_NAMES = tuple(str(d) for d in range(10))


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw images (N, 8, 8) float32 in 0..16 and labels (N,) int64, loaded once."""
    with gzip.open(DATA_FILE, "rt", encoding="ascii") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = torch.from_numpy(table[:, :64].reshape(-1, 8, 8).astype(np.float32))
    labels = torch.from_numpy(table[:, 64])
    return images, labels


@lru_cache(maxsize=len(SIZES))
def digit_images(size: int) -> torch.Tensor:
    """All 1,797 digits as (N, 1, size, size) float32 in [-1, 1], computed once per size."""
    if size not in SIZES:
        raise ValueError(f"digits size must be one of {SIZES}, got {size!r}")
    unit = _raw_digits()[0].unsqueeze(1) / 16.0  # [0, 1], background 0
    if size != unit.shape[-1]:
        unit = F.interpolate(
            unit, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        ).clamp(0.0, 1.0)
    return (unit * 2.0 - 1.0).contiguous()


def digit_labels() -> torch.Tensor:
    """Labels (N,) int64 of all 1,797 digits, in the same order as ``digit_images``."""
    return _raw_digits()[1]


def _test_counts(class_counts: torch.Tensor, num_test: int) -> torch.Tensor:
    """Per-class test counts proportional to class size, summing to ``num_test`` exactly.

    Largest-remainder rounding: floor every share, then give the leftover images to the classes
    with the largest fractional parts (ties to the lower class index).
    """
    shares = class_counts.double() * num_test / class_counts.sum()
    counts = shares.floor().long()
    leftover = num_test - int(counts.sum())
    order = sorted(range(len(shares)), key=lambda c: (-(shares[c] - counts[c]).item(), c))
    for c in order[:leftover]:
        counts[c] += 1
    return counts


@lru_cache(maxsize=1)
def split_indices() -> dict[str, torch.Tensor]:
    """Sorted indices into the full set for "train" (1,500), "test" (297) and "all" (1,797)."""
    labels = digit_labels()
    class_counts = torch.bincount(labels, minlength=len(CLASS_NAMES))
    test_counts = _test_counts(class_counts, NUM_TEST)
    generator = torch.Generator().manual_seed(derive_seed(SPLIT_SEED))
    test = []
    for c in range(len(CLASS_NAMES)):
        members = torch.nonzero(labels == c).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[: test_counts[c]]]
        test.append(chosen)
    test_index = torch.cat(test).sort().values
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test_index] = True
    return {
        "train": torch.nonzero(~is_test).flatten(),
        "test": test_index,
        "all": torch.arange(len(labels)),
    }


class DigitsDataset(Dataset):
    """Handwritten digits, items ``{"x": (1, size, size) in [-1, 1], "y": int64 class}``."""

    num_classes = 10
    class_names = CLASS_NAMES

    def __init__(self, split: str = "train", size: int = 16):
        if split not in SPLITS:
            raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
        if size not in SIZES:
            raise ValueError(f"digits size must be one of {SIZES}, got {size!r}")
        self.split = split
        self.image_shape = (1, size, size)
        index = split_indices()[split]
        self.indices = index.clone()  # positions in scikit-learn's original order
        self.images = digit_images(size)[index]
        self.labels = digit_labels()[index]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.images[i].clone(), "y": self.labels[i].clone()}
