"""Condition dropout for classifier-free guidance, owned by the training task.

One model learns p(x | c) and p(x) when, during training, each example's condition is replaced
by the null condition at a fixed rate: class labels by the null label (``num_classes``),
captions by the empty caption ``""``. Why here and not inside the network: the mask comes from
the step's ``torch.Generator`` (resumed runs repeat it exactly), and a method that runs two
networks on one batch (online and target network, student and teacher) gives both the same
dropped condition. The networks themselves never alter their condition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.guidance import NULL_CAPTION


def drop_mask(n: int, prob: float, generator: torch.Generator) -> Tensor:
    """(n,) bools on the generator's device, each True with probability `prob`."""
    if isinstance(prob, bool) or not isinstance(prob, int | float) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"a condition dropout probability must be a number in [0, 1], got {prob!r}")
    return torch.rand(n, generator=generator, device=generator.device) < prob


def drop_labels(y: Tensor, prob: float, null_label: int, generator: torch.Generator) -> Tensor:
    """`y` with each label replaced by `null_label` with probability `prob`. With prob 0 the
    generator is not drawn from, so runs without dropout see the same random numbers as before."""
    if prob == 0:
        return y
    drop = drop_mask(len(y), prob, generator).to(y.device)
    return torch.where(drop, torch.full_like(y, null_label), y)


def drop_captions(captions: Sequence[str], prob: float, generator: torch.Generator) -> list[str]:
    """`captions` with each replaced by "" (the null caption) with probability `prob`."""
    if isinstance(captions, str):
        raise ValueError(f"captions must be a list of strings, got the single string {captions!r}")
    if prob == 0:
        return list(captions)
    drop = drop_mask(len(captions), prob, generator).tolist()
    return [NULL_CAPTION if d else c for c, d in zip(captions, drop, strict=True)]
