"""Shared helpers for the network tests (no tests here)."""

from __future__ import annotations

import torch
from torch import nn


def perturb_zero_params_(net: nn.Module, scale: float = 0.1, seed: int = 2) -> int:
    """Give every all-zero tensor (zero-init convs, projections, adaLN-Zero, biases) random
    values and return how many there were.

    With zero-initialised outputs the gradient to everything upstream is exactly 0 and the
    output ignores the conditions; perturbing makes "every parameter gets a gradient" and
    "the output depends on X" real checks.
    """
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
                count += 1
    return count


def perturbed(net: nn.Module, seed: int = 2) -> nn.Module:
    """`net` with its zero-initialised tensors randomised, in eval mode."""
    perturb_zero_params_(net, seed=seed)
    return net.eval()
