"""Methods trained in rounds, each round a complete run: progressive distillation's round R
trains RUN/round-R with the previous round's exported student as its teacher, so every round
has a fresh optimizer, its own checkpoints and its own model folder (the benchmark samples
each round's student at its own step count). Resuming continues the first unfinished round."""

from __future__ import annotations

from pathlib import Path

from difflab.pipelines.folder import MANIFEST_FILE, MODEL_DIR
from difflab.train.checkpoint import latest_checkpoint
from difflab.train.config import Config, save_config


def round_dirs(run_dir: str | Path, rounds: int) -> list[Path]:
    return [Path(run_dir) / f"round-{r}" for r in range(1, rounds + 1)]


def round_config(config: Config, r: int, previous: Path | None) -> Config:
    """Round r's config (1-based): the teacher is the previous round's model, and it takes
    half the steps of the previous round's teacher."""
    raw = config.to_dict()
    raw["distill"]["rounds"] = 1
    raw["distill"]["teacher_steps"] = config.distill.teacher_steps >> (r - 1)
    if previous is not None:
        raw["distill"]["teacher"] = str(previous / MODEL_DIR)
    return Config.from_dict(raw)


def run_rounds(config: Config, run_dir: str | Path, resume: bool = False) -> Path:
    """Train every round of `config.distill.rounds` into RUN/round-1, RUN/round-2, ...; returns
    the last round's run folder (its model/ is the final student)."""
    from difflab.train.runner import CONFIG_FILE, run

    run_dir = Path(run_dir)
    dirs = round_dirs(run_dir, config.distill.rounds)
    started = [d for d in dirs if latest_checkpoint(d) is not None or (d / MODEL_DIR / MANIFEST_FILE).is_file()]
    if started and not resume:
        raise ValueError(f"{run_dir} already holds rounds {[d.name for d in started]}; resume it (--resume)")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)  # what `difflab train --resume RUN` continues
    previous = None
    for r, directory in enumerate(dirs, start=1):
        if not (directory / MODEL_DIR / MANIFEST_FILE).is_file():
            run(round_config(config, r, previous), directory, resume=latest_checkpoint(directory) is not None)
        previous = directory
    return dirs[-1]
