"""Conversions between model-range images ([-1, 1] floats), uint8 pixels and PIL images, and
grid PNGs of a batch.

Why one place: every data set maps pixels to [-1, 1] the same way, and every sampler/benchmark
turns samples back into pictures; keeping both directions here makes them exact inverses.
"""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def from_uint8_images(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels (any layout) -> float32 in [-1, 1]: 0 -> -1 and 255 -> 1."""
    pixels = torch.as_tensor(pixels)
    if pixels.dtype != torch.uint8:
        raise ValueError(f"from_uint8_images expects uint8 pixels, got dtype {pixels.dtype}")
    return pixels.to(torch.float32) / 127.5 - 1.0


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3).

    16/32-bit grey ("I" modes) is scaled from 16 bits (PIL's own convert would clip it), and
    transparency is composited over white.
    """
    if image.mode.startswith("I"):
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def pil_to_tensor(image: Image.Image, channels: int, size: int | None = None) -> torch.Tensor:
    """A PIL image -> (channels, H, W) float32 in [-1, 1], channels 1 (luma) or 3 (RGB).

    With ``size`` the image is scaled (antialiased bicubic) and centre-cropped to size x size.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    image = _to_channels(image, channels)
    if size is not None:
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    pixels = pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1)
    return from_uint8_images(pixels.contiguous())


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255], same shape and layout.

    Values outside [-1, 1] are clipped; NaN becomes mid-grey and +-inf the extremes, so a
    diverged sample still yields a picture one can look at.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"to_uint8_images expects a floating-point tensor, got {type(x)!r}")
    x = torch.nan_to_num(x.detach().to("cpu", torch.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def make_grid(
    x: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0
) -> torch.Tensor:
    """Tile a batch (B, C, H, W) into one image (C, H', W') with ``nrow`` images per row.

    The grid is ``nrow`` images wide (fewer if B < nrow) and ceil(B / nrow) images tall, with
    ``padding`` pixels of ``pad_value`` around every image, so its size is
    (rows * (H + padding) + padding, cols * (W + padding) + padding).
    """
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"make_grid expects a non-empty batch (B, C, H, W), got {tuple(x.shape)}")
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    batch, channels, height, width = x.shape
    cols = min(nrow, batch)
    rows = math.ceil(batch / cols)
    grid = torch.full(
        (channels, rows * (height + padding) + padding, cols * (width + padding) + padding),
        float(pad_value),
        dtype=x.dtype,
        device=x.device,
    )
    for i in range(batch):
        top = padding + (i // cols) * (height + padding)
        left = padding + (i % cols) * (width + padding)
        grid[:, top : top + height, left : left + width] = x[i]
    return grid


def save_grid(
    x: torch.Tensor,
    path: str | Path,
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write a batch in [-1, 1] (B, C, H, W) with C in {1, 3} as one grid PNG; return the path.

    The parent folder is created if needed. See ``make_grid`` for the grid's size.
    """
    if x.ndim not in (3, 4) or x.shape[-3] not in (1, 3):
        raise ValueError(
            f"save_grid expects (B, C, H, W) or (C, H, W) with C in (1, 3), got {tuple(x.shape)}"
        )
    pixels = to_uint8_images(make_grid(x, nrow=nrow, padding=padding, pad_value=pad_value))
    array = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)  # L or RGB
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
