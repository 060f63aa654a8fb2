"""`run(config, run_dir, resume)`: everything `difflab train` does, from recipe to exported model.

A run folder holds config.toml, log.jsonl, loss.png, samples/, checkpoints/ckpt-<step>/ and,
once training finished, model/ (the EMA network + diffusion.json, see `load_pipeline`).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from difflab.pipelines.folder import MODEL_DIR
from difflab.train.batches import build_dataset
from difflab.train.checkpoint import CheckpointSkipped, Found, list_checkpoints, newest_readable, set_aside
from difflab.train.config import RESUMABLE_CHANGES, Config, apply_overrides, config_changes, load_config, save_config
from difflab.train.distributed import Dist, process_rank, setup
from difflab.train.loop import STATE_KEYS, Trainer
from difflab.train.monitor import truncate_log
from difflab.train.preflight import check_recipe
from difflab.train.tasks import DataInfo, build_task

CONFIG_FILE = "config.toml"


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a run was trained with (from its newest readable checkpoint), with `overrides`
    applied: what `difflab train --resume RUN` uses when no recipe is given."""
    return _run_config(Path(run_dir), _newest(run_dir), overrides)


def _newest(run_dir: str | Path) -> Found | None:
    """The checkpoint a resumed run continues from: the newest that verifies (see `newest_readable`)."""
    return newest_readable(run_dir, STATE_KEYS, process_rank())


def _run_config(run_dir: Path, found: Found | None, overrides: Sequence[str]) -> Config:
    if found is None and (run_dir / "round-1").is_dir() and (run_dir / CONFIG_FILE).is_file():
        return load_config(run_dir / CONFIG_FILE, overrides)  # a run in rounds: its recipe
    if found is None:
        raise ValueError(_no_checkpoint(run_dir))
    return Config.from_dict(apply_overrides(found.state["config"], overrides))


def _no_checkpoint(run_dir: Path) -> str:
    message = f"cannot resume {run_dir}: it has no checkpoint (checkpoints/ckpt-<step>/)"
    if (run_dir / CONFIG_FILE).is_file():  # stopped before its first checkpoint: a new run starts it over
        message += f"; start it again with: difflab train {run_dir / CONFIG_FILE} --out {run_dir}"
    return message


def _resume_state(config: Config, run_dir: Path, found: Found | None) -> dict:
    if found is None:
        raise ValueError(_no_checkpoint(run_dir))
    state = found.state
    changed = [k for k in config_changes(Config.from_dict(state["config"]), config) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ValueError(
            f"the config differs from the one {run_dir} was trained with in {changed}; a resumed run may change "
            f"only {', '.join(RESUMABLE_CHANGES)}"
        )
    if state["step"] > config.train.steps:
        raise ValueError(f"{found.path} is at step {state['step']}, beyond train.steps = {config.train.steps}")
    return state


def check_new_run(run_dir: Path) -> None:
    """A new run goes into a new folder, or into one whose run stopped before its first checkpoint
    (it has no checkpoint and no model: the new run starts it over), in a place that can be written."""
    if list_checkpoints(run_dir) or (run_dir / MODEL_DIR).exists():
        raise ValueError(f"{run_dir} already holds a run; resume it (--resume) or choose a new folder")
    check_writable_folder(run_dir, "the run folder")


def check_writable_folder(folder: Path, what: str) -> None:
    """`folder` is a folder, or can be created, and can be written; checked without creating it."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{what} {folder} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder} is not writable: permission denied on {existing}")


def _load_state(trainer: Trainer, found: Found) -> None:
    """The checkpoint's state into a freshly built trainer; a state that does not fit the run is
    reported with its file, not as a raw KeyError."""
    try:
        trainer.load_state_dict(found.state)
    except (KeyError, TypeError, IndexError, RuntimeError) as error:
        details = " ".join(str(error).split())  # torch's messages span lines
        raise ValueError(f"cannot resume from {found.path}: {type(error).__name__}: {details}") from None


def write_provenance(run_dir: Path, trainer: Trainer) -> None:
    """Beside the exported model: the resolved recipe and how long training took, so a model
    folder (a shipped one too) says how it was made."""
    import json
    import platform

    model_dir = run_dir / MODEL_DIR
    shutil.copyfile(run_dir / CONFIG_FILE, model_dir / "recipe.toml")
    last = trainer.records[-1] if trainer.records else {}
    record = {
        "steps": trainer.step,
        "wall_seconds": last.get("train_s"),
        "final_loss": last.get("loss"),
        "world_size": trainer.dist.world_size,
        "device": str(trainer.device),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    (model_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def make_trainer(config: Config, run_dir: str | Path, dist: Dist | None = None) -> Trainer:
    """Data set, task and trainer of a fresh run (seeded: the same config gives the same
    initial weights)."""
    torch.manual_seed(config.train.seed)
    data = dict(config.data)
    if data.get("name") == "folder":
        data.setdefault("on_error", config.train.on_bad_image)
    dataset = build_dataset(data, config.train.on_bad_image)
    autoencoder = None
    if config.latent.autoencoder:  # latent diffusion: encode the data once, train on the latents
        from difflab.methods.latent import LatentDataset, load_autoencoder

        device = dist.device if dist is not None else "cpu"
        autoencoder = load_autoencoder(config.latent.autoencoder, device=device)
        dataset = LatentDataset.encode(autoencoder, dataset, batch_size=config.latent.batch_size)
    task = build_task(config, DataInfo.of(dataset, autoencoder=autoencoder), dist)
    return Trainer(task, dataset, config, run_dir, dist)


def run(
    config: Config | str | Path | None, run_dir: str | Path, resume: bool = False, overrides: Sequence[str] = ()
) -> Path:
    """Train `config` (a Config, or a recipe path plus `overrides`) into `run_dir`.

    With `resume`, continue from the newest checkpoint in `run_dir` that verifies (`config`
    None: the run's own config); newer damaged ones are skipped with a warning and set aside as
    ckpt-<step>.corrupt. The result equals an uninterrupted run's bit for bit. Without `resume`,
    `run_dir` must be new or hold a run that stopped before its first checkpoint (no checkpoint,
    no model), which is started over. Everything is checked before the folder is touched: raises
    ValueError for a bad config, a folder that already holds a run or cannot be written;
    TrainingDiverged on NaN/inf, TrainingInterrupted after SIGINT/SIGTERM (a checkpoint is
    written first).
    """
    run_dir = Path(run_dir)
    found = _newest(run_dir) if resume else None
    if config is None:
        if not resume:
            raise ValueError("a config is needed unless resuming a run")
        config = _run_config(run_dir, found, overrides)
    elif not isinstance(config, Config):
        config = load_config(config, overrides)
    elif overrides:
        config = Config.from_dict(apply_overrides(config.to_dict(), overrides))
    check_recipe(config)  # everything is checked before the run folder is touched
    if config.distill.rounds > 1:  # progressive distillation: one run per round
        from difflab.train.rounds import run_rounds

        return run_rounds(config, run_dir, resume)
    if not resume:
        check_new_run(run_dir)
    state = _resume_state(config, run_dir, found) if resume else None

    dist = setup(config.train.device, config.train.parallel)
    try:
        trainer = make_trainer(config, run_dir, dist)  # the data set's and the task's checks, still before
        if dist.is_main:  # the folder is touched
            run_dir.mkdir(parents=True, exist_ok=True)
            for damaged in found.skipped if found is not None else ():
                warnings.warn(f"set aside the damaged checkpoint as {set_aside(damaged)}", CheckpointSkipped, 2)
            truncate_log(run_dir, state["step"] if state is not None else 0)  # a new run starts an old log over
            save_config(config, run_dir / CONFIG_FILE)
        dist.barrier()
        if state is not None:
            _load_state(trainer, found)
        trainer.fit()
        model = trainer.sampling_model()  # collective under FSDP
        if dist.is_main:
            trainer.task.export(model, run_dir / MODEL_DIR)
            write_provenance(run_dir, trainer)
        dist.barrier()
        return run_dir
    finally:
        dist.close()
