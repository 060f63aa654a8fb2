"""Modules a task uses but never trains: a distillation teacher, a ControlNet's locked base
U-Net, a frozen text encoder.

A task declares them as ``frozen = {name: Frozen(module, source)}``. The loop moves them to
the device in eval mode without gradients and keeps them out of the optimizer, the EMA and the
checkpoint tensors: a checkpoint records only where each was loaded from and a fingerprint of
its weights. A resumed run rebuilds the task from its config, which loads them again from
their sources, and refuses to continue if the weights found there are not the ones it started
with (the run would silently learn from a different teacher).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Frozen:
    """A frozen module and the path it was loaded from (recorded in checkpoints)."""

    module: nn.Module
    source: str

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Frozen:
        """A network saved with ``save_pretrained`` (see ``difflab.nets.load_network``)."""
        from difflab.nets import load_network

        return cls(load_network(path, device=device), str(path))


def fingerprint(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the module's state_dict tensors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def freeze(frozen: dict[str, Frozen], trainable: nn.Module, device: torch.device) -> dict[str, dict]:
    """Move each frozen module to `device` in eval mode with requires_grad False; return the
    record a checkpoint keeps of each ({name: {"source", "fingerprint"}}). Raises ValueError
    for an entry that is not a `Frozen` or a frozen parameter that `trainable` also trains."""
    if not isinstance(frozen, dict):
        raise ValueError(f"a task's frozen must be a dict of name -> Frozen, got {type(frozen).__name__}")
    trained = {id(p) for p in trainable.parameters()}
    records = {}
    for name, entry in frozen.items():
        if not isinstance(entry, Frozen):
            raise ValueError(f"frozen[{name!r}] must be a Frozen(module, source), got {type(entry).__name__}")
        shared = [key for key, p in entry.module.named_parameters() if id(p) in trained]
        if shared:
            raise ValueError(
                f"frozen module {name!r} (from {entry.source}) shares parameters {shared[:3]} with the trainable "
                "model; a module is either trained or frozen (keep a copy if both are meant)"
            )
        records[name] = {"source": entry.source, "fingerprint": fingerprint(entry.module)}
        entry.module.to(device).eval().requires_grad_(False)
    return records


def check_unchanged(recorded: dict[str, dict], current: dict[str, dict]) -> None:
    """Raise ValueError unless the frozen modules of a resumed run are those of its checkpoint."""
    if sorted(recorded) != sorted(current):
        raise ValueError(
            f"the checkpoint was trained with frozen modules {sorted(recorded)} but the task now declares "
            f"{sorted(current)}; resuming would not continue the same run"
        )
    for name, record in recorded.items():
        if current[name]["fingerprint"] != record["fingerprint"]:
            raise ValueError(
                f"frozen module {name!r} loaded from {current[name]['source']} changed since the run started "
                f"(it was loaded from {record['source']}); restore its weights or start a new run"
            )
