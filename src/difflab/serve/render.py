"""A job's samples as one PNG: images tiled in a grid (the page enlarges it without smoothing),
2-D points drawn on a square canvas."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from difflab.data.images import make_grid, to_uint8_images

PADDING = 2  # white pixels between and around the images
SCATTER_SIZE = 256


def grid_columns(n: int) -> int:
    """Images per row: a square-ish grid."""
    return math.ceil(math.sqrt(n))


def grid_size(n: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) of the PNG of n images of height x width."""
    cols = min(grid_columns(n), n)
    rows = math.ceil(n / cols)
    return cols * (width + PADDING) + PADDING, rows * (height + PADDING) + PADDING


def to_png(x: Tensor) -> tuple[bytes, int, int]:
    """(PNG bytes, width, height) of a batch: images (n, C, H, W) in [-1, 1] with C 1 or 3, or
    2-D points (n, 2)."""
    if x.ndim == 4 and x.shape[1] in (1, 3):
        grid = make_grid(x.clamp(-1.0, 1.0), nrow=grid_columns(x.shape[0]), padding=PADDING)
        pixels = to_uint8_images(grid).permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else np.ascontiguousarray(pixels))
    elif x.ndim == 2 and x.shape[1] == 2:
        image = _scatter(x)
    else:
        raise ValueError(f"cannot draw samples of shape {tuple(x.shape)}: images (n, 1|3, H, W) or points (n, 2)")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), image.width, image.height


def _scatter(points: Tensor) -> Image.Image:
    """Points on a white square, scaled so the farthest one sits near the edge."""
    image = Image.new("L", (SCATTER_SIZE, SCATTER_SIZE), 255)
    draw = ImageDraw.Draw(image)
    finite = points[points.isfinite().all(1)].float()
    reach = float(finite.abs().max()) * 1.05 if len(finite) else 1.0
    scale = (SCATTER_SIZE / 2 - 2) / max(reach, 1e-6)
    for px, py in finite.tolist():
        u, v = SCATTER_SIZE / 2 + px * scale, SCATTER_SIZE / 2 - py * scale
        draw.rectangle((u - 1, v - 1, u + 1, v + 1), fill=0)
    return image
