"""Data sets with one contract: items are dicts, images are float32 (C, H, W) in [-1, 1].

Image sets give ``{"x": (C, H, W), "y": int64 class (where the set has classes),
"caption": str (where it has captions)}``; 2-D toy sets give ``{"x": (2,)}``. Every set
exposes ``num_classes`` (or None) and ``image_shape``; class sets also ``class_names``.
Start from ``get_dataset(name, split, **options)``.
"""

from difflab.data.digits import DigitsDataset
from difflab.data.folder import ImageFolderDataset
from difflab.data.images import from_uint8_images, make_grid, save_grid, to_uint8_images
from difflab.data.registry import DATASET_NAMES, get_dataset
from difflab.data.shapes import ShapesDataset, parse_caption, render
from difflab.data.toy2d import (
    Toy2DDataset,
    grid_mixture_params,
    ring_mixture_params,
    sample_mixture,
    sample_toy2d,
)

__all__ = [
    "DATASET_NAMES",
    "DigitsDataset",
    "ImageFolderDataset",
    "ShapesDataset",
    "Toy2DDataset",
    "from_uint8_images",
    "get_dataset",
    "grid_mixture_params",
    "make_grid",
    "parse_caption",
    "render",
    "ring_mixture_params",
    "sample_mixture",
    "sample_toy2d",
    "save_grid",
    "to_uint8_images",
]
