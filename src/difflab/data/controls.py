"""Control images for ControlNet, computed from the data: foreground masks, Sobel edge maps, a
Canny-like edge detector, and a user's PNG read as a control image.

Every control here is a (B, 1, H, W) float map in {0, 1} (1 = foreground / edge) computed from
images in [-1, 1], in torch, on the images' device, with no randomness: a training task can
compute the control of each batch itself, the benchmark can compute the same control from a
sample, and a user's PNG is read into the same range.

- ``mask``: pixels whose largest channel difference from the background colour is at least
  ``threshold`` (1, half of a full step). On generated shapes this is exactly the renderer's
  coverage >= 0.5 (every palette colour has a channel at +1 against the black background at
  -1), so `shapes_mask` (from the scene, via the renderer) and `foreground` agree pixel for pixel.
- ``edges``: Sobel gradient magnitude >= ``threshold``; a step edge gives a 2-pixel band (the
  pixels on both sides of it).
- ``canny``: Canny's steps on the Sobel gradient: non-maximum suppression across the edge (ties,
  as on both sides of a sharp step, go to the brighter side, so a bright object's edge lies on
  its own outer pixels) and hysteresis (weak edges kept where 8-connected to strong ones).

Gradients of colour images: each pixel takes the channel with the largest Sobel magnitude
(Canny's colour variant), so a blue shape on black has the same edges as a white one.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

HINT_KINDS = ("mask", "edges", "canny")
BACKGROUND = -1.0  # the background of the shapes and the digits: black, -1 in every channel
MASK_THRESHOLD = 1.0
SOBEL_THRESHOLD = 0.5
CANNY_LOW, CANNY_HIGH = 0.2, 0.5
# Sobel kernels divided by 8: a step from -1 to 1 gives magnitude 1 on both of its sides
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def check_images(x, name: str = "images") -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float (B, C, H, W) tensor, got {got}")
    return x


# --------------------------------------------------------------------------- masks


def foreground(x: Tensor, background: float = BACKGROUND, threshold: float = MASK_THRESHOLD) -> Tensor:
    """(B, 1, H, W) in {0, 1}: pixels whose largest channel difference from `background` is at
    least `threshold`."""
    check_images(x)
    distance = (x.float() - background).abs().amax(dim=1, keepdim=True)
    return (distance >= threshold).float()


def shapes_mask(scene, size: int) -> Tensor:
    """(1, size, size) in {0, 1}: the pixels a shapes scene's objects cover at least half of,
    from the renderer's exact coverage (the ground truth `foreground` reproduces from pixels)."""
    from difflab.data.shape_render import coverage
    from difflab.data.shape_scenes import check_scene

    covered = torch.stack([coverage(obj, size) for obj in check_scene(scene)]).amax(dim=0)
    return (covered >= 0.5).float()[None]


# --------------------------------------------------------------------------- edges


def sobel(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(magnitude, gx, gy), each (B, 1, H, W): the Sobel gradient of the channel with the largest
    magnitude at each pixel (borders replicated, so an image's frame is no edge)."""
    check_images(x)
    b, c, h, w = x.shape
    kx = _SOBEL_X.to(x.device)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    padded = F.pad(x.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(padded, kernels).reshape(b, c, 2, h, w)
    magnitude = grad.square().sum(dim=2).sqrt()
    best = magnitude.argmax(dim=1, keepdim=True)  # (B, 1, H, W)
    pick = best[:, :, None].expand(b, 1, 2, h, w)
    gx, gy = grad.gather(1, pick).unbind(dim=2)
    return magnitude.gather(1, best), gx, gy


def sobel_edges(x: Tensor, threshold: float = SOBEL_THRESHOLD) -> Tensor:
    """(B, 1, H, W) in {0, 1}: Sobel magnitude >= threshold."""
    return (sobel(x)[0] >= threshold).float()


def _shift(t: Tensor, dy: int, dx: int) -> Tensor:
    """t[y + dy, x + dx] at (y, x), zero beyond the border."""
    h, w = t.shape[-2:]
    padded = F.pad(t, (1, 1, 1, 1))
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


# The four directions a gradient is quantised to, as the (dy, dx) of the neighbour it points to.
_DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1))


def canny_edges(x: Tensor, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Tensor:
    """(B, 1, H, W) in {0, 1}: Canny-like edges (see the module docstring): Sobel gradient,
    non-maximum suppression along the gradient direction (quantised to 0, 45, 90, 135 degrees),
    then hysteresis between `low` and `high`."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    magnitude, gx, gy = sobel(x)
    angle = torch.atan2(gy, gx)  # the gradient points from dark to bright
    sector = torch.round(angle / (math.pi / 4)).long() % 8  # 0..7, opposite directions 4 apart
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for k, (dy, dx) in enumerate(_DIRECTIONS):
        ahead, behind = _shift(magnitude, dy, dx), _shift(magnitude, -dy, -dx)  # neighbours along +-(dy, dx)
        along = sector == k  # gradient along +(dy, dx): "ahead" is the brighter side
        against = sector == k + 4  # gradient along -(dy, dx): "behind" is the brighter side
        # a maximum across the edge; of two equal neighbours across a sharp step, the brighter one
        keep |= along & (magnitude > ahead) & (magnitude >= behind)
        keep |= against & (magnitude >= ahead) & (magnitude > behind)
    candidates = keep & (magnitude >= low)
    edges = candidates & (magnitude >= high)
    for _ in range(x.shape[-2] * x.shape[-1]):  # grow strong edges along weak ones until nothing changes
        grown = candidates & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.float()


def make_hint(kind: str, x: Tensor) -> Tensor:
    """The control of images x (B, C, H, W) in [-1, 1]: (B, 1, H, W) in {0, 1}."""
    if kind == "mask":
        return foreground(x)
    if kind == "edges":
        return sobel_edges(x)
    if kind == "canny":
        return canny_edges(x)
    raise ValueError(f"unknown control kind {kind!r}; allowed: {', '.join(HINT_KINDS)}")


def hint_picture(hint: Tensor, channels: int) -> Tensor:
    """A control image in [0, 1] as a picture in [-1, 1] with `channels` channels (for grids)."""
    picture = hint.float() * 2.0 - 1.0
    return picture if picture.shape[1] == channels else picture.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)


# --------------------------------------------------------------------------- data sets


class HintDataset(Dataset):
    """Items of `dataset` with a "hint": the control of their image (1, H, W). A shapes set's
    masks come from the renderer (`shapes_mask` of the item's scene); everything else is
    computed from the item's "x" with `make_hint`."""

    def __init__(self, dataset: Dataset, kind: str = "mask"):
        if kind not in HINT_KINDS:
            raise ValueError(f"unknown control kind {kind!r}; allowed: {', '.join(HINT_KINDS)}")
        self.dataset, self.kind = dataset, kind

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        scene = getattr(self.dataset, "scene", None)
        if self.kind == "mask" and scene is not None:
            item["hint"] = shapes_mask(scene(i), item["x"].shape[-1])
        else:
            item["hint"] = make_hint(self.kind, item["x"][None])[0]
        return item

    def __getattr__(self, name: str):  # num_classes, image_shape, ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


# --------------------------------------------------------------------------- a user's control image


def load_hint(source, channels: int, size: tuple[int, int] | list[int]) -> Tensor:
    """A control image as a (B, channels, H, W) float32 tensor in [0, 1].

    `source`: a PNG (or any image PIL reads) path, converted to grey (1 channel) or RGB (3), its
    pixels / 255; or a tensor (C, H, W) or (B, C, H, W) with values in [0, 1]. A size other than
    `size` (H, W) or a channel count other than `channels` is an error naming both."""
    height, width = int(size[0]), int(size[1])
    if isinstance(source, str | Path):
        hint = _read_image(Path(source), channels)
        where = f"control image {source}"
    elif isinstance(source, Tensor):
        if source.ndim not in (3, 4) or not (source.is_floating_point() or source.dtype == torch.bool):
            raise ValueError(
                f"a control tensor must be a float (C, H, W) or (B, C, H, W) tensor in [0, 1], got dtype "
                f"{source.dtype} and shape {tuple(source.shape)}"
            )
        hint = (source[None] if source.ndim == 3 else source).float()
        where = "control tensor"
        if hint.shape[1] != channels:
            raise ValueError(f"the {where} has {hint.shape[1]} channel(s); this model's control takes {channels}")
        if not torch.isfinite(hint).all() or hint.min() < 0 or hint.max() > 1:
            raise ValueError(f"the {where} must hold values in [0, 1], got [{hint.min():g}, {hint.max():g}]")
    else:
        raise ValueError(f"a control image must be a PNG path or a tensor, got {type(source).__name__}")
    if tuple(hint.shape[-2:]) != (height, width):
        raise ValueError(
            f"the {where} is {hint.shape[-2]}x{hint.shape[-1]} (HxW); this model's control is {height}x{width}"
        )
    return hint


def _read_image(path: Path, channels: int) -> Tensor:
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"a control PNG gives 1 (grey) or 3 (RGB) channels; this model's control takes {channels}")
    if not path.is_file():
        raise ValueError(f"control image {path} does not exist")
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            w, h = image.size
    except OSError as error:
        raise ValueError(f"cannot read control image {path}: {error}") from None
    return (pixels.reshape(h, w, channels).permute(2, 0, 1).float() / 255.0)[None]
