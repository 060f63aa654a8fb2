"""Down- and up-sampling between the resolutions of a cascade, and the Gaussian blur of blur
augmentation (Ho et al. 2021).

Why these choices: `downsample` is an area (box) average, which for an integer factor is the
exact antialiased reduction (each low-resolution pixel is the mean of its block), so the
consistency check downsample(SR(x_low)) vs x_low has an unambiguous meaning; `upsample` is a
fixed interpolation (bilinear or bicubic, as Imagen conditions its super-resolution stages
on the low-resolution image resized up), so the stage's condition has the size of its output
and is concatenated to x_t channel by channel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic")


def _check_images(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} needs float (B, C, H, W) images, got {got}")


def resize_factor(high: int, low: int) -> int:
    """The integer factor from `low` to `high` pixels, or a clear error."""
    if not (isinstance(high, int) and isinstance(low, int)) or low < 1 or high < low or high % low:
        raise ValueError(f"the high resolution must be an integer multiple of the low one, got {high} and {low}")
    return high // low


def downsample(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size) by averaging each block of H / size pixels (H = W)."""
    _check_images(x, "downsample")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"downsample needs square images, got {tuple(x.shape[-2:])}")
    factor = resize_factor(x.shape[-1], size)
    return x if factor == 1 else F.avg_pool2d(x, factor)


def upsample(x: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """(B, C, h, h) -> (B, C, size, size) by `mode` interpolation (pixel centres aligned as in
    `downsample`, align_corners false); bicubic may overshoot [-1, 1] slightly and is not clipped."""
    _check_images(x, "upsample")
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {mode!r}; allowed: {', '.join(UPSAMPLE_MODES)}")
    resize_factor(size, x.shape[-1])
    if x.shape[-1] == size:
        return x
    options = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, size=(size, size), mode=mode, **options)


def gaussian_blur(x: Tensor, sigma: Tensor | float, radius: int | None = None) -> Tensor:
    """Each image blurred by a normalised Gaussian of its own std `sigma` (pixels; a number or
    (B,)); reflect padding keeps the borders' brightness. sigma 0 leaves an image unchanged."""
    _check_images(x, "gaussian_blur")
    batch = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float64).flatten()
    sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
    if sigma.shape != (batch,) or not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise ValueError(f"sigma must be one finite number >= 0 or one per image ({batch}), got {sigma.tolist()}")
    if radius is None:
        radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    safe = sigma.clamp(min=1e-12)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernel = torch.where(sigma[:, None] > 0, kernel, (offsets[None] == 0).to(torch.float64))
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x)  # (B, K)
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    # one grouped convolution per direction: every (image, channel) pair has its own kernel
    flat = padded.reshape(1, batch * channels, *padded.shape[-2:])
    k = kernel.repeat_interleave(channels, 0)
    flat = F.conv2d(flat, k[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(flat, k[:, None, :, None], groups=batch * channels)
    return flat.reshape(x.shape)
