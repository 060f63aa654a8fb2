"""Trained diffusion models used as teachers (distillation, consistency distillation): loaded
from their model folder as frozen modules, sampled as their manifest says."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from difflab.denoiser import Denoiser
from difflab.train.tasks.frozen import Frozen


def load_teacher(path: str | Path) -> tuple[Frozen, Denoiser, dict]:
    """(frozen network, denoiser, manifest) of a trained model: a model folder, a run or a
    shipped name. The denoiser applies the manifest's x0 thresholding, so the teacher's steps
    are the ones it takes when it samples."""
    from difflab.guidance import as_saved
    from difflab.pipelines import load_pipeline, resolve

    directory = resolve(path)
    raw, manifest = load_pipeline(directory)
    return Frozen(raw.net, str(directory)), as_saved(raw, manifest), manifest


def trainable_copy(net: nn.Module) -> nn.Module:
    """A student initialised from a teacher's weights: a copy in train mode with gradients."""
    return copy.deepcopy(net).train().requires_grad_(True)


def check_teacher_data(manifest: dict, sample_shape: tuple[int, ...], source: str) -> None:
    if tuple(manifest["sample_shape"]) != tuple(sample_shape):
        raise ValueError(
            f"the teacher {source} draws samples of shape {tuple(manifest['sample_shape'])} but the data's examples "
            f"have shape {tuple(sample_shape)}; train on the data the teacher was trained on"
        )


def teacher_condition(manifest: dict, batch: dict) -> dict | None:
    """The cond a class-conditional teacher (and its student) is called with: the batch's labels."""
    if manifest.get("conditioning") == "class":
        return {"y": batch["y"]}
    if manifest.get("conditioning") is not None:
        raise ValueError(f"distilling a {manifest['conditioning']}-conditional teacher is not supported yet")
    return None

