"""Draw a shapes scene exactly, anti-aliased, at any resolution from 16 to 128 pixels.

Why analytic drawing: each object is an exact geometric region (disc, square, upward triangle)
centred in its grid cell; a pixel's value is the fraction of a 4x4 grid of sample points inside
the region (box-filtered supersampling). That gives smooth edges, identical results on every
machine, and a coverage mask per object that tests and evaluations can use directly.

Geometry, in pixels (pixel i covers [i, i+1)): cell side c = size / 3; an object's extent (the
circle's diameter, the square's side, the triangle's base and height) is 0.5 c when small and
0.8 c when big, so neighbouring objects are at least 0.2 c apart.
"""

import numpy as np
import torch

from difflab.data.shape_scenes import BACKGROUND, PALETTE, check_scene
from difflab.vocabulary import COLUMNS, ROWS

MIN_SIZE, MAX_SIZE = 16, 128
SUPERSAMPLE = 4  # sample points per pixel along each axis
EXTENT = {"small": 0.5, "big": 0.8}  # object extent as a fraction of the cell side


def check_image_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"image size must be an int in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    return size


def object_box(obj: dict, size: int) -> tuple[float, float, float]:
    """(centre_x, centre_y, half_extent) of a complete object in pixel units."""
    row_name, column_name = obj["position"].split(" ")
    cell = size / len(ROWS)
    centre_x = (COLUMNS.index(column_name) + 0.5) * cell
    centre_y = (ROWS.index(row_name) + 0.5) * cell
    return centre_x, centre_y, EXTENT[obj["size"]] * cell / 2


def _coverage(obj: dict, size: int) -> np.ndarray:
    """Coverage (size, size) float64 of one validated object (numpy: tiny arrays, no threads)."""
    centre_x, centre_y, half = object_box(obj, size)
    points = (np.arange(size * SUPERSAMPLE, dtype=np.float64) + 0.5) / SUPERSAMPLE
    dx = (points - centre_x)[None, :]
    dy = (points - centre_y)[:, None]
    if obj["shape"] == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif obj["shape"] == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # triangle, apex up: half-width grows from 0 at the top to `half` at the base
        inside = (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def coverage(obj: dict, size: int) -> torch.Tensor:
    """Fraction (size, size) float32 in [0, 1] of each pixel that the object covers."""
    (obj,) = check_scene(obj)
    return torch.from_numpy(_coverage(obj, check_image_size(size)).astype(np.float32))


def _rgb(name: str) -> np.ndarray:
    rgb = BACKGROUND if name == "background" else PALETTE[name]
    return np.asarray(rgb, dtype=np.float64) / 127.5 - 1.0


def colour_vector(name: str) -> torch.Tensor:
    """A palette colour (or "background") as a (3,) float32 in [-1, 1]."""
    return torch.from_numpy(_rgb(name).astype(np.float32))


def render(scene: dict | list[dict], size: int = 32) -> torch.Tensor:
    """Draw a complete scene (object dict or list of them) as (3, size, size) in [-1, 1]."""
    objects = check_scene(scene)
    size = check_image_size(size)
    image = np.broadcast_to(_rgb("background")[:, None, None], (3, size, size))
    for obj in objects:
        alpha = _coverage(obj, size)[None]
        image = image * (1 - alpha) + _rgb(obj["colour"])[:, None, None] * alpha
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
