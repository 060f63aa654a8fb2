"""How closely samples follow their control image: mask IoU and edge F1 with a pixel tolerance.

Both take (B, 1, H, W) maps (anything > 0.5 counts as set) and return one score per image, so a
benchmark can average them or look at the worst. Empty against empty scores 1 (nothing was asked
and nothing drawn); empty against non-empty scores 0.

Edge F1 with tolerance d (as in edge-detection benchmarks, BSDS, with a square neighbourhood
instead of a matching): precision = the share of predicted edge pixels within d pixels (Chebyshev
distance) of a true edge pixel, recall = the share of true edge pixels within d of a predicted
one, F1 their harmonic mean. With d = 1 an edge drawn one pixel off still counts, two pixels off
does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _binary(name: str, m: Tensor) -> Tensor:
    if not isinstance(m, Tensor) or m.ndim != 4 or m.shape[1] != 1:
        got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"{name} must be a (B, 1, H, W) map, got {got}")
    return m > 0.5


def _pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    p, t = _binary("pred", pred), _binary("target", target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    return p, t.to(p.device)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """(B,) |pred and target| / |pred or target| per image (1 where both are empty)."""
    p, t = _pair(pred, target)
    inter = (p & t).flatten(1).sum(1).double()
    union = (p | t).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def dilate(m: Tensor, tolerance: int) -> Tensor:
    """Every pixel within `tolerance` (Chebyshev distance) of a set pixel."""
    if tolerance == 0:
        return m
    return F.max_pool2d(m.float(), 2 * tolerance + 1, stride=1, padding=tolerance) > 0


def edge_f1(pred: Tensor, target: Tensor, tolerance: int = 1) -> Tensor:
    """(B,) F1 of predicted edges against true ones, each matched within `tolerance` pixels."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be an int >= 0 (pixels), got {tolerance!r}")
    p, t = _pair(pred, target)
    n_p, n_t = p.flatten(1).sum(1).double(), t.flatten(1).sum(1).double()
    precision = (p & dilate(t, tolerance)).flatten(1).sum(1).double() / n_p.clamp(min=1)
    recall = (t & dilate(p, tolerance)).flatten(1).sum(1).double() / n_t.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    both_empty = (n_p == 0) & (n_t == 0)
    return torch.where(both_empty, torch.ones_like(f1), f1)
