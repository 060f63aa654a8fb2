"""Generated "shapes" data set: coloured circles, squares and triangles on a black background.

Why generated: every image comes with exact attributes and a caption, so class-conditional,
text-conditional and compositional (two-object) generation can be scored without any download.
Item i of a set with a given seed is always the same image: its scene is derived from
(seed, split, index) alone and drawn on the fly, so the set can have any length.

Vocabulary, caption grammar and labels live in ``shape_scenes``; drawing in ``shape_render``.
Items::

    {"x": (3, size, size) float32 in [-1, 1], "y": int64 class, "caption": str,
     "labels": {"shape"|"colour"|"size"|"position": int64 (num_objects,)}}

The class ``y`` follows ``label``: "shape" (3 classes), "colour" (6) or "shape_colour"
(18, the default: y = shape_index * 6 + colour_index, class names like "red circle"). With
``two_objects=True`` the class describes the first object named in the caption.
"""

import operator

import torch
from torch.utils.data import Dataset

from difflab.data.seeding import check_seed, split_code
from difflab.data.shape_render import check_image_size, coverage, render
from difflab.data.shape_scenes import (
    ATTRIBUTES,
    COLOURS,
    SHAPES,
    attribute_labels,
    caption,
    parse_caption,
    random_scene,
)

__all__ = [
    "ATTRIBUTES",
    "LABEL_SCHEMES",
    "ShapesDataset",
    "attribute_labels",
    "caption",
    "coverage",
    "parse_caption",
    "random_scene",
    "render",
]

LABEL_SCHEMES = {
    "shape": SHAPES,
    "colour": COLOURS,
    "shape_colour": tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS),
}
DEFAULT_LENGTH = {"train": 10_000, "test": 1_000}


def class_label(obj: dict, label: str) -> int:
    """The class index of one object under a label scheme (see ``LABEL_SCHEMES``)."""
    if label == "shape":
        return SHAPES.index(obj["shape"])
    if label == "colour":
        return COLOURS.index(obj["colour"])
    return SHAPES.index(obj["shape"]) * len(COLOURS) + COLOURS.index(obj["colour"])


class ShapesDataset(Dataset):
    """Scenes of one or two objects; see the module docstring for items and labels.

    ``split`` picks an independent stream of scenes ("train" or "test"); ``n`` defaults to
    10,000 (train) or 1,000 (test). The finite vocabulary means that both splits contain
    repeated and shared scenes: they are two samples of one distribution, not disjoint images.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        n: int | None = None,
        seed: int = 0,
        two_objects: bool = False,
        label: str = "shape_colour",
    ):
        self._stream = split_code(split)
        if label not in LABEL_SCHEMES:
            raise ValueError(f"label must be one of {list(LABEL_SCHEMES)}, got {label!r}")
        n = DEFAULT_LENGTH[split] if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        check_image_size(size)
        if not isinstance(two_objects, bool):
            raise ValueError(f"two_objects must be True or False, got {two_objects!r}")
        self.split = split
        self.size = size
        self.n = n
        self.seed = check_seed(seed)
        self.num_objects = 2 if two_objects else 1
        self.label = label
        self.class_names = LABEL_SCHEMES[label]
        self.num_classes = len(self.class_names)
        self.image_shape = (3, size, size)

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> list[dict[str, str]]:
        """The attributes of item ``i`` (a list of object dicts) without drawing it."""
        index = operator.index(i)  # any integer type (int, numpy or 0-dim torch integers)
        if not 0 <= index < self.n:
            raise IndexError(f"index {i!r} out of range for a shapes set of length {self.n}")
        return random_scene(self.seed, index, self.num_objects, stream=self._stream)

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        return {
            "x": render(scene, self.size),
            "y": torch.tensor(class_label(scene[0], self.label), dtype=torch.int64),
            "caption": caption(scene),
            "labels": attribute_labels(scene),
        }
