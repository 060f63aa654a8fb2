"""Rebuild a trained denoiser from a run folder (or its exported `model/`): JSON + safetensors.

This is what `difflab sample RUN` calls; it needs no training code and no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difflab.denoiser import NetworkDenoiser
from difflab.schedules import Schedule
from difflab.train.tasks import DIFFUSION_FILE, DIFFUSION_FORMAT

MODEL_DIR = "model"


def find_model_dir(path: str | Path) -> Path:
    """`path` itself if it holds diffusion.json, else `path/model` (a run folder)."""
    path = Path(path)
    for candidate in (path, path / MODEL_DIR):
        if (candidate / DIFFUSION_FILE).is_file():
            return candidate
    raise ValueError(
        f"{path} is neither a run folder with {MODEL_DIR}/{DIFFUSION_FILE} nor a model folder with "
        f"{DIFFUSION_FILE}; was training finished (the model is exported at the end)?"
    )


def load_pipeline(path: str | Path, device: str | torch.device = "cpu") -> tuple[NetworkDenoiser, dict]:
    """The denoiser of a trained run (network in eval mode on `device`) and its metadata:
    schedule, T, prediction, variance, sample_shape, num_classes and default sampling settings."""
    from difflab.nets import load_network

    directory = find_model_dir(path)
    meta = json.loads((directory / DIFFUSION_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != DIFFUSION_FORMAT:
        raise ValueError(f"{directory / DIFFUSION_FILE} has format {meta.get('format')!r}, not {DIFFUSION_FORMAT!r}")
    net = load_network(directory, device=device)
    schedule = Schedule.make(meta["schedule"], meta["T"], zero_terminal_snr=meta["zero_terminal_snr"])
    denoiser = NetworkDenoiser(net, schedule, meta["prediction"], meta["variance"], tuple(meta["sample_shape"]))
    return denoiser, meta
