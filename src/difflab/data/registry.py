"""``get_dataset(name, split, **options)``: one entry point from a config name to a data set.

Why: configs, the training loop and benchmarks name data sets by string; one table maps those
names to constructors, and unknown names or options fail with the allowed ones listed.
"""

import inspect
from pathlib import Path

from torch.utils.data import Dataset

from difflab.data import torchvision_sets
from difflab.data.digits import DigitsDataset
from difflab.data.folder import ImageFolderDataset
from difflab.data.shapes import ShapesDataset
from difflab.data.toy2d import Toy2DDataset


def _folder(split: str, root: str | Path | None = None, **options) -> ImageFolderDataset:
    """``root/<split>/`` if that folder exists, else ``root`` itself as the "train" split."""
    if root is None:
        raise ValueError("the 'folder' data set needs root=<path to an image folder>")
    root = Path(root)
    if (root / split).is_dir():
        return ImageFolderDataset(root / split, **options)
    if split == "train":
        return ImageFolderDataset(root, **options)
    raise ValueError(f"split {split!r} needs a sub-folder {str(root / split)!r}, which is missing")


def keyword_names(func, exclude: tuple[str, ...] = ("split",)) -> tuple[str, ...]:
    """Names of the keyword arguments ``func`` takes explicitly (not via ``**kwargs``)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(func).parameters.values()
    return tuple(p.name for p in parameters if p.kind in kinds and p.name not in exclude)


_BUILDERS = {
    "digits": DigitsDataset,
    "shapes": ShapesDataset,
    "toy2d": Toy2DDataset,
    "folder": _folder,
    "mnist": torchvision_sets.mnist,
    "cifar10": torchvision_sets.cifar10,
}
DATASET_NAMES = tuple(_BUILDERS)
# None: the data set checks its options itself (toy2d's depend on its kind).
_OPTIONS = {name: keyword_names(builder) for name, builder in _BUILDERS.items()}
_OPTIONS["folder"] = ("root", *keyword_names(ImageFolderDataset, exclude=("root",)))
_OPTIONS["toy2d"] = None


def get_dataset(name: str, split: str = "train", **options) -> Dataset:
    """The data set ``name`` (one of ``DATASET_NAMES``) for ``split`` with ``options``.

    Options are the constructor's keyword arguments, e.g. ``get_dataset("digits", size=32)``,
    ``get_dataset("shapes", size=64, two_objects=True)``, ``get_dataset("toy2d", kind="moons")``,
    ``get_dataset("folder", root="imgs", size=64)``, ``get_dataset("mnist", root="data")``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASET_NAMES)}")
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed)) if allowed is not None else []
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for data set {name!r}; allowed: {allowed}")
    return _BUILDERS[name](split=split, **options)
