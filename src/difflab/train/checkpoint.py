"""Checkpoints without pickle: one folder per step holding safetensors + JSON.

Layout: ``RUN/checkpoints/ckpt-<step>/`` with ``tensors.safetensors`` (every tensor of the
state, under its path in the state tree such as ``optimizer/state/0/exp_avg``) and
``state.json`` (everything else, with ``{"__tensor__": key}`` where a tensor was). A folder
is written under a temporary name, fsynced and renamed in one step, so a crash or a full disk
never leaves a half-written ``ckpt-<step>``: discovery only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "difflab-checkpoint"
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"ckpt-(\d+)")
_MARKERS = ("__tensor__", "__tuple__", "__items__")


# ---------------------------------------------------------------- state tree <-> (JSON, tensors)
def split_tensors(tree: Any, path: str = "", tensors: dict | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a tree of dicts/lists/tuples by a reference, collecting the tensors.

    Tuples and dicts with non-string keys (optimizer state is keyed by int) are tagged so that
    `join_tensors` gives back exactly what was saved.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(tree, torch.Tensor):
        key = path or "tensor"
        if key in tensors:
            raise ValueError(f"two tensors in the checkpoint state map to the same key {key!r}")
        tensors[key] = tree.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}, tensors
    if isinstance(tree, tuple):
        return {"__tuple__": [split_tensors(v, f"{path}/{i}", tensors)[0] for i, v in enumerate(tree)]}, tensors
    if isinstance(tree, list):
        return [split_tensors(v, f"{path}/{i}", tensors)[0] for i, v in enumerate(tree)], tensors
    if isinstance(tree, dict):
        sub = lambda k: f"{path}/{k}" if path else str(k)  # noqa: E731
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: split_tensors(v, sub(k), tensors)[0] for k, v in tree.items()}, tensors
        return {"__items__": [[k, split_tensors(v, sub(k), tensors)[0]] for k, v in tree.items()]}, tensors
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree, tensors
    raise ValueError(f"cannot store {type(tree).__name__} at {path!r} in a checkpoint; use tensors or JSON values")


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors`."""
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1 and next(iter(tree)) in _MARKERS:
        ((marker, value),) = tree.items()
        if marker == "__tensor__":
            if value not in tensors:
                raise ValueError(f"checkpoint state refers to tensor {value!r}, which {TENSORS_FILE} lacks")
            return tensors[value]
        if marker == "__tuple__":
            return tuple(join_tensors(v, tensors) for v in value)
        return {k: join_tensors(v, tensors) for k, v in value}
    return {k: join_tensors(v, tensors) for k, v in tree.items()}


# ---------------------------------------------------------------- RNG states as tensors + JSON
def capture_rng() -> dict:
    """The global RNG states of python, numpy and torch (CPU, and CUDA once initialised)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {**np_state["state"], "key": np_state["state"]["key"].tolist()}
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- folders
def checkpoint_step(path: Path) -> int | None:
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (or of a checkpoints folder), oldest first."""
    root = Path(run_dir)
    if (root / CHECKPOINTS_DIR).is_dir():
        root = root / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int | None = None) -> Path:
    """Write `state` as `RUN/checkpoints/ckpt-<step>` atomically, then keep only the newest `keep`.

    A step's checkpoint is written once: if it already exists it is left as it is.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step}"
    if not (final / STATE_FILE).is_file():
        tree, tensors = split_tensors(state)
        tmp = root / f".tmp-ckpt-{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        record = {"format": FORMAT, "version": VERSION, "step": step, "state": tree}
        (tmp / STATE_FILE).write_text(json.dumps(record), encoding="utf-8")
        for file in (tmp / TENSORS_FILE, tmp / STATE_FILE, tmp):
            _fsync(file)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder (no state.json) of the same step
        os.rename(tmp, final)
        _fsync(root)
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
        for stale in root.glob(".tmp-ckpt-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict:
    """The state tree saved by `save_checkpoint` (tensors on CPU)."""
    path = Path(path)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise ValueError(f"{path} is not a checkpoint: it has no {STATE_FILE}")
    record = json.loads(state_path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ValueError(
            f"{state_path} has format {record.get('format')!r} version {record.get('version')!r}; "
            f"this difflab reads {FORMAT!r} version {VERSION}"
        )
    tensors = load_file(str(path / TENSORS_FILE), device="cpu")
    return join_tensors(record["state"], tensors)
