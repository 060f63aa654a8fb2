"""Data-parallel training across processes, and the single-process case as the same object.

Launch with ``torchrun --nproc_per_node=N -m difflab.cli train ...``: torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and `setup` joins the group (gloo on
CPU, nccl on GPU). Without those variables everything here is a no-op for one process, so
the training loop has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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

    @property
    def is_main(self) -> bool:
        """Only the main process writes files (logs, checkpoints, pictures)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel when there are several processes (it also copies rank 0's
        initial weights to every rank), the model itself otherwise."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

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


def setup(device: str = "auto") -> Dist:
    """Join the process group described by torchrun's environment variables (if any)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return Dist(device=pick_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, chosen, owns)
