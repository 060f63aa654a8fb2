"""Checkpoints without pickle: one folder per step holding safetensors + JSON.

Layout: ``RUN/checkpoints/ckpt-<step>/`` with ``tensors.safetensors`` (every tensor of the
state, under its path in the state tree such as ``optimizer/state/0/exp_avg``) and
``state.json`` (everything else, with ``{"__tensor__": key}`` where a tensor was). A folder
is written under a temporary name, fsynced and renamed in one step, so a crash or a full disk
never leaves a half-written ``ckpt-<step>``: discovery only ever sees complete checkpoints.

Under FSDP (`train.parallel = "fsdp"`) the state holds sharded DTensors: each is stored as
``{"__shard__": key, "shape", "stride"}``, rank 0's shards in ``tensors.safetensors`` beside
everything else and rank r's in ``shard-<r>.safetensors``; ``state.json`` records ``shards``
(the number of processes), and only as many processes can resume it.

A disk can still damage a finished one, so `load_checkpoint` verifies what it reads (the JSON,
the safetensors header against the file's size, the keys a caller requires, finite floating
tensors) and raises `CheckpointError` naming the file; `newest_readable` is what resuming
uses: the newest checkpoint that verifies, with a warning for each newer one it skips.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from difflab.tensorfiles import TensorFileError, load_tensors
from difflab.train.distributed import process_rank
from difflab.train.sharding import LocalShard

FORMAT = "difflab-checkpoint"
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
CHECKPOINTS_DIR = "checkpoints"
SHARD_FILE = "shard-{rank}.safetensors"
_NAME = re.compile(r"ckpt-(\d+)")
_MARKERS = ("__tensor__", "__tuple__", "__items__", "__shard__")
CORRUPT_SUFFIX = ".corrupt"  # a damaged checkpoint set aside: no longer listed, never pruned


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, damaged or incomplete (the message names it)."""


class WorldSizeMismatch(ValueError):
    """A sharded (FSDP) checkpoint read by another number of processes than wrote it: the
    checkpoint is fine, the launch is not, so resuming stops instead of skipping it."""


class CheckpointSkipped(UserWarning):
    """A damaged checkpoint was passed over for an older one."""


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
        if isinstance(tree, DTensor):  # this process's shard of a tensor split across processes (FSDP)
            tensors[key] = tree.to_local().detach().to("cpu", copy=True).contiguous()
            return {"__shard__": key, "shape": list(tree.shape), "stride": list(tree.stride())}, tensors
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
    if "__shard__" in tree:
        key = tree["__shard__"]
        if key not in tensors:
            raise ValueError(f"checkpoint state refers to the shard {key!r}, which the tensors files lack")
        return LocalShard(tensors[key], tree["shape"], tree["stride"])
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
    root, final = _folders(run_dir, step)
    if not (final / STATE_FILE).is_file():
        tmp = root / f".tmp-ckpt-{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_and_publish(tmp, final, step, *split_tensors(state))
    _prune(root, keep)
    return final


def save_sharded_checkpoint(
    run_dir: str | Path, step: int, state: dict, rank: int, world_size: int, barrier, keep: int | None = None
) -> Path:
    """`save_checkpoint` of an FSDP run, called by every process with its own state (`barrier`
    waits for all of them): rank r > 0 writes its shards into the temporary folder, then rank 0
    writes everything else and publishes the folder in one rename."""
    root, final = _folders(run_dir, step)
    if not (final / STATE_FILE).is_file():  # every process sees the same: publishing comes after the barriers
        tmp = root / f".tmp-ckpt-{step}-shards"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        tree, tensors = split_tensors(state)
        if rank != 0:
            shards = {key: tensors[key] for key in _shard_keys(tree)}
            save_file(shards, str(tmp / SHARD_FILE.format(rank=rank)), metadata={"format": FORMAT})
            _fsync(tmp / SHARD_FILE.format(rank=rank))
        barrier()
        if rank == 0:
            _write_and_publish(tmp, final, step, tree, tensors, shards=world_size)
    barrier()
    if rank == 0:
        _prune(root, keep)
    return final


def _folders(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    return root, root / f"ckpt-{step}"


def _write_and_publish(tmp: Path, final: Path, step: int, tree: Any, tensors: dict, **record_extra) -> None:
    """The tensors and state.json into `tmp`, fsynced, then `tmp` renamed to `final`."""
    save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
    record = {"format": FORMAT, "version": VERSION, "step": step, **record_extra, "state": tree}
    (tmp / STATE_FILE).write_text(json.dumps(record), encoding="utf-8")
    for file in (tmp / TENSORS_FILE, tmp / STATE_FILE, tmp):
        _fsync(file)
    shutil.rmtree(final, ignore_errors=True)  # an incomplete folder (no state.json) of the same step
    os.rename(tmp, final)
    _fsync(final.parent)


def _prune(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    for stale in root.glob(".tmp-ckpt-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _shard_keys(tree: Any) -> list[str]:
    """The tensor keys of the shards (FSDP DTensors) in a split state tree."""
    if isinstance(tree, list):
        return [k for v in tree for k in _shard_keys(v)]
    if not isinstance(tree, dict):
        return []
    if "__shard__" in tree:
        return [tree["__shard__"]]
    return [k for v in tree.values() for k in _shard_keys(v)]


def load_checkpoint(path: str | Path, required: Iterable[str] = (), process: tuple[int, int] | None = None) -> dict:
    """The state tree saved by `save_checkpoint` (tensors on CPU), verified: raises
    CheckpointError (naming the file) for unreadable JSON, a damaged or truncated tensors file,
    a missing `required` top-level key or a floating tensor that is not finite. A sharded
    checkpoint gives the shards of `process` = (rank, world size), by default this process's
    under torchrun, as LocalShards; another world size raises WorldSizeMismatch."""
    path = Path(path)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it has no {STATE_FILE}")
    try:
        record = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{state_path} cannot be read: {error}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        found = (record.get("format"), record.get("version")) if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{state_path} has format/version {found!r}; this difflab reads {FORMAT!r} {VERSION}")
    if checkpoint_step(path) is not None and record.get("step") != checkpoint_step(path):
        raise CheckpointError(f"{state_path} says step {record.get('step')!r}, but the folder is {path.name}")
    rank, world = process or process_rank()
    shards = record.get("shards")
    if shards is not None and shards != world:  # not damage: the run needs as many processes as wrote it
        raise WorldSizeMismatch(
            f"{path} is sharded across {shards} processes (train.parallel = 'fsdp'); resume it with "
            f"torchrun --nproc_per_node={shards}, not {world} process{'es' if world != 1 else ''}"
        )
    try:
        tensors = load_tensors(path / TENSORS_FILE)
        if shards is not None:
            tensors.update(_own_shards(path, record, rank))
        state = join_tensors(record.get("state"), tensors)
    except TensorFileError as error:
        raise CheckpointError(str(error)) from None
    except (ValueError, TypeError) as error:  # a state tree that does not fit its tensors
        raise CheckpointError(f"{path}: {error}") from None
    _check_state(path, state, tuple(required))
    return state


def _own_shards(path: Path, record: dict, rank: int) -> dict[str, torch.Tensor]:
    """Rank r's shards (rank 0's are in the tensors file itself)."""
    if rank == 0:
        return {}
    own = load_tensors(path / SHARD_FILE.format(rank=rank))
    missing = sorted(set(_shard_keys(record.get("state"))) - set(own))
    if missing:
        raise CheckpointError(f"{path / SHARD_FILE.format(rank=rank)} lacks the shards {missing[:3]}")
    return own


def _check_state(path: Path, state: Any, required: tuple[str, ...]) -> None:
    if required and not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE} holds no state dict")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path / STATE_FILE} lacks {missing}: the checkpoint is incomplete or damaged")
    for key, tensor in _tensors(state):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path / TENSORS_FILE} holds non-finite values (NaN or inf) in {key!r}")


def _tensors(tree: Any, path: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor (or shard) in a state tree."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, LocalShard):
        yield path, tree.tensor
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{path}/{key}" if path else str(key))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{path}/{i}")


@dataclass
class Found:
    """What `newest_readable` found: the checkpoint, its state, and the newer ones it skipped."""

    path: Path
    state: dict
    skipped: list[Path] = field(default_factory=list)


def newest_readable(
    run_dir: str | Path, required: Iterable[str] = (), process: tuple[int, int] | None = None
) -> Found | None:
    """The newest checkpoint of a run that verifies (`load_checkpoint`), warning (CheckpointSkipped)
    for each newer one that does not; None if the run has no checkpoint. Raises CheckpointError,
    listing every problem, when it has checkpoints but none verifies. Deletes nothing."""
    problems = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return Found(path, load_checkpoint(path, required, process), [p for p, _ in problems])
        except CheckpointError as error:
            warnings.warn(f"skipping the damaged checkpoint {path}: {error}", CheckpointSkipped, stacklevel=2)
            problems.append((path, str(error)))
    if problems:
        raise CheckpointError(
            f"none of the {len(problems)} checkpoints of {run_dir} can be read: "
            + "; ".join(message for _, message in problems)
            + ". Move them away to train it again from the start"
        )
    return None


def set_aside(path: str | Path) -> Path:
    """Rename a damaged checkpoint to ckpt-<step>.corrupt (kept for inspection, never listed, so
    a resumed run writes that step afresh and pruning never counts it)."""
    path = Path(path)
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}{CORRUPT_SUFFIX}-{n}"), n + 1
    os.rename(path, target)
    return target
