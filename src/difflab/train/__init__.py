"""Training: TOML recipes, one loop for every task, pickle-free resumable checkpoints,
data-parallel runs with torchrun, and `load_pipeline` to sample from a finished run."""

from difflab.pipelines import load_decoder, load_pipeline
from difflab.train.config import Config, load_config, save_config
from difflab.train.loop import TrainingDiverged, TrainingInterrupted
from difflab.train.runner import load_run_config, run

__all__ = [
    "Config",
    "TrainingDiverged",
    "TrainingInterrupted",
    "load_config",
    "load_decoder",
    "load_pipeline",
    "load_run_config",
    "run",
    "save_config",
]
