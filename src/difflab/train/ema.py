"""An exponential moving average of a model's weights: the weights one samples from.

Why a full copy of the module: sampling, the sample grid and the export all need a
runnable network with the averaged weights, and a copy is one.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    """shadow <- d * shadow + (1 - d) * weights after every optimizer step.

    With `warmup`, d = min(decay, (1 + n) / (10 + n)) after n updates, so early weights (from
    random init) are forgotten quickly. Buffers (e.g. norm statistics) are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self._start(decay, warmup)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def _start(self, decay: float, warmup: bool) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for shadow, weight in zip(self.model.parameters(), model.parameters(), strict=True):
            shadow.lerp_(weight.detach(), 1.0 - d)
        for shadow, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            shadow.copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, object]:
        return {"num_updates": self.num_updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        weights: dict[str, Tensor] = state["weights"]
        self.model.load_state_dict(weights)
