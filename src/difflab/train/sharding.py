"""Fully sharded data parallelism (PyTorch FSDP2, `fully_shard`) for models larger than one
device's memory: `train.parallel = "fsdp"` under torchrun.

Each process keeps 1 / world of every weight, gradient, Adam moment and EMA weight, as DTensors
sharded along dim 0; a block's full weights exist only during its forward and backward. What
needs a whole network (the sample grid, the exported model) gathers one on every process
(`full_copy`), so those calls are collective. Checkpoints stay sharded: each process writes its
own shards (see `checkpoint.save_sharded_checkpoint`) and a run resumes with the same number of
processes, bit for bit like a DDP run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from difflab.train.ema import EMA


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """`fully_shard` every block held in an nn.ModuleList (innermost first), then the root, so a
    block's weights are gathered just before it runs. The model is changed in place."""
    from torch.distributed.fsdp import fully_shard

    containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
    blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    for block in reversed(blocks):  # modules() is pre-order: reversed puts inner blocks first
        if not isinstance(block, containers) and any(p.requires_grad for p in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local(t: Tensor) -> Tensor:
    """This process's part of a tensor: the shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather for a DTensor: every process must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: full(v).detach() for k, v in state.items()}


@dataclass
class LocalShard:
    """A DTensor as a checkpoint stores it: this process's shard and the whole tensor's shape
    and stride; `to_dtensor` makes it a DTensor again on a mesh (sharded along dim 0)."""

    tensor: Tensor
    shape: list[int]
    stride: list[int]

    def to_dtensor(self, mesh) -> DTensor:
        return DTensor.from_local(
            self.tensor, mesh, [Shard(0)], run_check=False, shape=torch.Size(self.shape), stride=tuple(self.stride)
        )


def to_dtensors(tree, mesh):
    """A loaded state tree with its LocalShards made DTensors on `mesh`."""
    if isinstance(tree, LocalShard):
        return tree.to_dtensor(mesh)
    if isinstance(tree, dict):
        return {k: to_dtensors(v, mesh) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to_dtensors(v, mesh) for v in tree)
    return tree


class ShardedEMA(EMA):
    """The EMA of a sharded model, itself sharded: each process averages its own shards (no
    communication). `template` is an unsharded copy of the network (made before sharding) that
    `full_copy` fills with the gathered averages when a runnable network is needed."""

    def __init__(self, model: nn.Module, template: nn.Module, decay: float, warmup: bool = True):
        self._start(decay, warmup)
        self.template = template
        with torch.no_grad():
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.params = set(dict(model.named_parameters()))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for name, value in model.state_dict().items():
            if name in self.params:
                self.weights[name].lerp_(value.detach(), 1.0 - d)
            else:  # buffers are copied as they are
                self.weights[name].copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict[str, object]:
        return {"num_updates": self.num_updates, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        with torch.no_grad():
            for name, value in state["weights"].items():
                self.weights[name].copy_(value)

    def gathered(self) -> nn.Module:
        """The averaged network, whole (collective: every process calls it)."""
        return full_copy(self.weights, self.template)


def full_copy(state: dict[str, Tensor], template: nn.Module) -> nn.Module:
    """An unsharded network in eval mode with `state` gathered into a copy of `template`
    (collective: every process calls it)."""
    net = copy.deepcopy(template)
    net.load_state_dict(full_state(state))
    return net.eval()
