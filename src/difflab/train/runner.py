"""`run(config, run_dir, resume)`: everything `difflab train` does, from recipe to exported model.

A run folder holds config.toml, log.jsonl, loss.png, samples/, checkpoints/ckpt-<step>/ and,
once training finished, model/ (the EMA network + diffusion.json, see `load_pipeline`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from difflab.pipelines.folder import MODEL_DIR
from difflab.train.batches import build_dataset
from difflab.train.checkpoint import latest_checkpoint, load_checkpoint
from difflab.train.config import RESUMABLE_CHANGES, Config, apply_overrides, config_changes, load_config, save_config
from difflab.train.distributed import Dist, setup
from difflab.train.loop import Trainer
from difflab.train.monitor import LOG_FILE, truncate_log
from difflab.train.tasks import DataInfo, build_task

CONFIG_FILE = "config.toml"


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a run was trained with (from its latest checkpoint), with `overrides` applied:
    what `difflab train --resume RUN` uses when no recipe is given."""
    path = latest_checkpoint(run_dir)
    if path is None and (Path(run_dir) / "round-1").is_dir() and (Path(run_dir) / CONFIG_FILE).is_file():
        return load_config(Path(run_dir) / CONFIG_FILE, overrides)  # a run in rounds: its recipe
    if path is None:
        raise ValueError(f"{run_dir} has no checkpoint to resume from")
    return Config.from_dict(apply_overrides(load_checkpoint(path)["config"], overrides))


def _resume_state(config: Config, run_dir: Path) -> dict:
    path = latest_checkpoint(run_dir)
    if path is None:
        raise ValueError(f"cannot resume {run_dir}: it has no checkpoint (checkpoints/ckpt-<step>/)")
    state = load_checkpoint(path)
    changed = [k for k in config_changes(Config.from_dict(state["config"]), config) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ValueError(
            f"the config differs from the one {run_dir} was trained with in {changed}; a resumed run may change "
            f"only {', '.join(RESUMABLE_CHANGES)}"
        )
    if state["step"] > config.train.steps:
        raise ValueError(f"{path} is at step {state['step']}, beyond train.steps = {config.train.steps}")
    return state


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

    With `resume`, continue from the latest checkpoint in `run_dir` (`config` None: the run's
    own config); the result equals an uninterrupted run's bit for bit. Raises ValueError for a
    bad config or a run folder that already holds a run (without `resume`), TrainingDiverged
    on NaN/inf, TrainingInterrupted after SIGINT/SIGTERM (a checkpoint is written first).
    """
    run_dir = Path(run_dir)
    if config is None:
        if not resume:
            raise ValueError("a config is needed unless resuming a run")
        config = load_run_config(run_dir, overrides)
    elif not isinstance(config, Config):
        config = load_config(config, overrides)
    elif overrides:
        config = Config.from_dict(apply_overrides(config.to_dict(), overrides))
    if config.distill.rounds > 1:  # progressive distillation: one run per round
        from difflab.train.rounds import run_rounds

        return run_rounds(config, run_dir, resume)
    if not resume and (latest_checkpoint(run_dir) is not None or (run_dir / LOG_FILE).exists()):
        raise ValueError(f"{run_dir} already holds a run; resume it (--resume) or choose a new folder")
    state = _resume_state(config, run_dir) if resume else None

    dist = setup(config.train.device)
    try:
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if state is not None:
                truncate_log(run_dir, state["step"])
            save_config(config, run_dir / CONFIG_FILE)
        dist.barrier()
        trainer = make_trainer(config, run_dir, dist)
        if state is not None:
            trainer.load_state_dict(state)
        trainer.fit()
        if dist.is_main:
            trainer.task.export(trainer.sampling_model(), run_dir / MODEL_DIR)
            write_provenance(run_dir, trainer)
        dist.barrier()
        return run_dir
    finally:
        dist.close()
