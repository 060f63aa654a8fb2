"""Scenes, captions and attribute labels of the generated "shapes" world (its words live in
``difflab.vocabulary`` and are re-exported here).

Why separate from drawing: prompts and attribute classifiers need the words and label indices
without rendering anything.

A scene is a list of objects; an object is a dict with keys ``shape``, ``colour``, ``size`` and
``position`` whose values come from ``ATTRIBUTES``. The image is split into a 3x3 grid of cells
named "<row> <column>" with rows top/middle/bottom and columns left/centre/right; every object
sits centred in its own cell, so objects in different cells never overlap.

Caption grammar (lower case; objects joined by " and ")::

    object  := "a" [size] [colour] (shape | "shape") ["at the" position]
    caption := object (" and " object)*

e.g. "a small red circle at the top left and a big blue square at the bottom right". Captions
written by ``caption`` always name every attribute; ``parse_caption`` also accepts partial
prompts such as "a red shape", whose missing attributes are simply absent from the dict.
"""

import re

import torch

from difflab.data.seeding import derive_words
from difflab.vocabulary import ANY_SHAPE, ATTRIBUTES, COLOURS, POSITIONS, SHAPES, SIZES
from difflab.vocabulary import COLUMNS as COLUMNS
from difflab.vocabulary import ROWS as ROWS

# Pure primaries and secondaries: every pair differs by 255 in at least one channel.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
BACKGROUND = (0, 0, 0)  # black, i.e. -1 in every channel


def check_object(obj: dict, complete: bool = True) -> dict[str, str]:
    """Validate one object's attributes; ``complete`` requires all four attributes."""
    if not isinstance(obj, dict):
        raise ValueError(f"a scene object must be a dict of attributes, got {obj!r}")
    unknown = set(obj) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attribute(s) {sorted(unknown)}; allowed: {list(ATTRIBUTES)}")
    for name, value in obj.items():
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"{name} {value!r} is not one of {ATTRIBUTES[name]}")
    missing = [name for name in ATTRIBUTES if name not in obj]
    if complete and missing:
        raise ValueError(f"object {obj!r} is missing attribute(s) {missing}")
    return dict(obj)


def check_scene(scene: dict | list[dict], complete: bool = True) -> list[dict[str, str]]:
    """Validate a scene (one object dict or a list of them); return it as a list.

    A complete (drawable) scene also needs its objects in distinct cells, so that none overlap.
    """
    objects = [scene] if isinstance(scene, dict) else scene
    if not isinstance(objects, list | tuple) or not objects:
        raise ValueError(f"a scene must be an object dict or a non-empty list of them: {scene!r}")
    objects = [check_object(obj, complete) for obj in objects]
    positions = [obj.get("position") for obj in objects]
    if complete and len(set(positions)) != len(positions):
        raise ValueError(f"objects must be in distinct cells to not overlap, got {positions}")
    return objects


def caption(scene: dict | list[dict]) -> str:
    """The caption of a (possibly partial) scene, following the module's grammar."""
    phrases = []
    for obj in check_scene(scene, complete=False):
        words = ["a"]
        words += [obj[name] for name in ("size", "colour") if name in obj]
        words.append(obj.get("shape", ANY_SHAPE))
        if "position" in obj:
            words += ["at the", obj["position"]]
        phrases.append(" ".join(words))
    return " and ".join(phrases)


def _alternatives(words: tuple[str, ...]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_PATTERN = re.compile(
    rf"an? (?:(?P<size>{_alternatives(SIZES)}) )?(?:(?P<colour>{_alternatives(COLOURS)}) )?"
    rf"(?P<shape>{_alternatives((*SHAPES, ANY_SHAPE))})"
    rf"(?: at the (?P<position>{_alternatives(POSITIONS)}))?"
)


def parse_caption(text: str) -> list[dict[str, str]]:
    """Inverse of ``caption``: "a small red circle at the top left" -> [{...}].

    Case, surrounding whitespace, repeated spaces and a final full stop are ignored. Attributes a
    prompt leaves out are absent from its object dict (the noun "shape" leaves the shape out).
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a str, got {text!r}")
    normalised = " ".join(text.lower().split()).removesuffix(".").strip()
    objects = []
    for phrase in normalised.split(" and "):
        match = _OBJECT_PATTERN.fullmatch(phrase)
        if match is None:
            raise ValueError(
                f"cannot parse {phrase!r} in caption {text!r}; expected "
                f"'a [size] [colour] shape-word [at the position]' with size in {SIZES}, "
                f"colour in {COLOURS}, shape-word in {(*SHAPES, ANY_SHAPE)}, "
                f"position in {POSITIONS}"
            )
        obj = {k: v for k, v in match.groupdict().items() if v is not None and v != ANY_SHAPE}
        objects.append({name: obj[name] for name in ATTRIBUTES if name in obj})
    return objects


def attribute_labels(scene: dict | list[dict]) -> dict[str, torch.Tensor]:
    """Integer labels per attribute, each an int64 tensor (num_objects,).

    Label k means ``ATTRIBUTES[name][k]``; -1 marks an attribute the scene leaves unspecified.
    """
    objects = check_scene(scene, complete=False)
    return {
        name: torch.tensor(
            [vocab.index(obj[name]) if name in obj else -1 for obj in objects], dtype=torch.int64
        )
        for name, vocab in ATTRIBUTES.items()
    }


def random_scene(seed: int, index: int, num_objects: int = 1, stream: int = 0) -> list[dict]:
    """The scene of item ``index`` of a set with ``seed`` (``stream`` separates splits).

    Depends only on (seed, stream, index, num_objects), so a set can be any length without being
    stored. Attributes are uniform and independent; positions are drawn without replacement.
    """
    if not 1 <= num_objects <= len(POSITIONS):
        raise ValueError(f"num_objects must be in 1..{len(POSITIONS)}, got {num_objects!r}")
    words = [int(w) for w in derive_words(seed, stream, index, num_objects, count=4 * num_objects)]
    free_positions = list(POSITIONS)
    scene = []
    for k in range(num_objects):
        w_shape, w_colour, w_size, w_position = words[4 * k : 4 * k + 4]
        scene.append(
            {
                "shape": SHAPES[w_shape % len(SHAPES)],
                "colour": COLOURS[w_colour % len(COLOURS)],
                "size": SIZES[w_size % len(SIZES)],
                "position": free_positions.pop(w_position % len(free_positions)),
            }
        )
    return scene
