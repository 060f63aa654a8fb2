"""Rebuild a trained denoiser from a run folder (or its exported `model/`): JSON + safetensors.

This is what `difflab sample RUN` calls; it needs no training code and no pickle. A latent
diffusion pipeline also carries its autoencoder (`load_decoder`): the denoiser samples
latents, the decoder turns them into images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

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


def load_decoder(path: str | Path, device: str | torch.device = "cpu") -> Callable[[Tensor], Tensor] | None:
    """What turns the pipeline's samples into images: the autoencoder's `decode_scaled` for a
    latent model (its scale factor is the one the latents were trained with), None for a
    pixel model."""
    from difflab.methods.latent import load_autoencoder

    directory = find_model_dir(path)
    latent = json.loads((directory / DIFFUSION_FILE).read_text(encoding="utf-8")).get("latent")
    if latent is None:
        return None
    autoencoder = load_autoencoder(directory / latent["autoencoder"], device=device)
    if not math.isclose(float(autoencoder.scale_factor), latent["scale_factor"], rel_tol=1e-6):
        raise ValueError(
            f"{directory / latent['autoencoder']} has scale factor {float(autoencoder.scale_factor)} but the "
            f"model was trained on latents scaled by {latent['scale_factor']}"
        )
    return torch.no_grad()(autoencoder.decode_scaled)
