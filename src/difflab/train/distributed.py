"""Data-parallel training across processes, and the single-process case as the same object.

Launch with ``torchrun --nproc_per_node=N -m difflab.cli train ...``: torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `setup` joins the group (gloo on
CPU, nccl on GPU). Without those variables everything here is a no-op for one process, so
the training loop has a single code path. `train.parallel` chooses how several processes
share the work: "ddp" replicates the model (DistributedDataParallel), "fsdp" shards it
(`difflab.train.sharding`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # whether `close` should tear the process group down
    parallel: str = "ddp"  # "ddp" or "fsdp" (train.parallel); only matters with several processes
    mesh: object = field(default=None, repr=False)  # the device mesh FSDP shards over (set by `wrap`)

    @property
    def is_main(self) -> bool:
        """Only the main process writes files (logs, checkpoints, pictures)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether weights and optimizer state are split across processes (FSDP)."""
        return self.active and self.parallel == "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        """With several processes: DistributedDataParallel (it also copies rank 0's initial
        weights to every rank), or under FSDP the model itself, sharded in place; the model
        itself for one process."""
        if not self.active:
            return model
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh

            from difflab.train.sharding import shard_model

            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
            return shard_model(model, self.mesh)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def gradient_sync(self, wrapped: nn.Module, enabled: bool):
        """A context in which backward passes reduce gradients across processes or, disabled,
        only accumulate them locally (all micro-batches but the last)."""
        if not self.active or enabled:
            return contextlib.nullcontext()
        if self.sharded:
            return _fsdp_no_sync(wrapped)
        return wrapped.no_sync()

    def mean(self, values: Tensor) -> Tensor:
        """The mean over processes of a float tensor (same shape on every rank)."""
        if self.active:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world_size
        return values

    def gather(self, values: Tensor) -> Tensor:
        """All ranks' tensors (same shape everywhere) concatenated in rank order along dim 0."""
        if not self.active:
            return values
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun announced them, before the group is joined
    (a resumed FSDP run reads its own shards of the checkpoint)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU if there is one, else the CPU."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        preference = f"cuda:{local_rank}"
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device = {preference!r} but no CUDA GPU is available; use 'auto' or 'cpu'")
        torch.cuda.set_device(device)
    return device


def setup(device: str = "auto", parallel: str = "ddp") -> Dist:
    """Join the process group described by torchrun's environment variables (if any)."""
    _, world_size = process_rank()
    if world_size <= 1 and not dist.is_initialized():
        return Dist(device=pick_device(device), parallel=parallel)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, chosen, owns, parallel)
