"""MNIST and CIFAR-10 through torchvision, when it is installed and the files are present.

Why a thin wrapper: torchvision already knows these file formats; we only convert its
(PIL image, label) pairs to our item dicts. Nothing is downloaded unless ``download=True``.
torchvision is optional: without it these sets raise an ImportError that says so.
"""

from pathlib import Path

import torch
from torch.utils.data import Dataset

from difflab.data.images import pil_to_tensor

SPLITS = ("train", "test")
DEFAULT_ROOT = "data"


def _torchvision_datasets():
    """The ``torchvision.datasets`` module, or an ImportError naming the missing package."""
    try:
        from torchvision import datasets
    except ImportError as error:
        raise ImportError(
            "MNIST and CIFAR-10 need the optional package 'torchvision', which is not installed "
            "(pip install torchvision); the 'digits', 'shapes' and 'folder' sets work without it"
        ) from error
    return datasets


class LabelledImageDataset(Dataset):
    """Wraps any data set of (PIL image, int label) pairs into items ``{"x", "y"}``.

    ``x`` is (channels, H, W) in [-1, 1] (resized and centre-cropped to ``size`` if given).
    """

    def __init__(self, base, channels: int, class_names, size: int | None = None):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be None or a positive int, got {size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.base = base
        self.channels = channels
        self.size = size
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        first_image, _ = base[0]
        height, width = (size, size) if size is not None else first_image.size[::-1]
        self.image_shape = (channels, height, width)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, label = self.base[i]
        x = pil_to_tensor(image, self.channels, self.size)
        return {"x": x, "y": torch.tensor(int(label), dtype=torch.int64)}


def _load(name: str, split: str, root, download: bool):
    if split not in SPLITS:
        raise ValueError(f"{name} split must be one of {SPLITS}, got {split!r}")
    datasets = _torchvision_datasets()
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        return cls(root=str(root), train=split == "train", download=bool(download))
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} files not found under {Path(root).resolve()}; place torchvision's {name} "
            "files there or pass download=True (needs internet)"
        ) from error


def mnist(
    split: str = "train",
    root: str | Path = DEFAULT_ROOT,
    download: bool = False,
    size: int | None = None,
) -> LabelledImageDataset:
    """MNIST: 60,000 train / 10,000 test grey digits, (1, 28, 28) unless ``size`` is given."""
    base = _load("mnist", split, root, download)
    return LabelledImageDataset(base, 1, [str(d) for d in range(10)], size)


def cifar10(
    split: str = "train",
    root: str | Path = DEFAULT_ROOT,
    download: bool = False,
    size: int | None = None,
) -> LabelledImageDataset:
    """CIFAR-10: 50,000 train / 10,000 test colour images, (3, 32, 32) unless ``size``."""
    base = _load("cifar10", split, root, download)
    return LabelledImageDataset(base, 3, base.classes, size)
