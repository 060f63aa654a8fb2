"""Trained diffusion models used as teachers (distillation, consistency distillation): loaded
from their model folder as frozen modules, sampled as their manifest says."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from difflab.denoiser import Denoiser
from difflab.train.tasks.frozen import Frozen


def load_teacher(path: str | Path, guided: bool = False) -> tuple[Frozen, Denoiser, dict]:
    """(frozen network, denoiser, manifest) of a trained model: a model folder, a run or a
    shipped name. The denoiser applies the manifest's x0 thresholding, so the teacher's steps
    are the ones it takes when it samples. `guided`: classifier-free guidance of a
    class-conditional teacher with the weight of each example in cond["w"] (thresholded after
    guidance, as guided sampling does)."""
    from difflab.guidance import GuidanceFromCondition, as_saved
    from difflab.pipelines import load_pipeline, resolve

    directory = resolve(path)
    raw, manifest = load_pipeline(directory)
    frozen = Frozen(raw.net, str(directory))
    if guided:
        if manifest.get("conditioning") != "class":
            raise ValueError(
                f"guidance distillation needs a class-conditional teacher trained with label dropout; {directory} "
                f"has conditioning {manifest.get('conditioning')!r}"
            )
        raw = GuidanceFromCondition(raw, {"y": int(manifest["num_classes"])})
    return frozen, as_saved(raw, manifest), manifest


def trainable_copy(net: nn.Module) -> nn.Module:
    """A student initialised from a teacher's weights: a copy in train mode with gradients."""
    return copy.deepcopy(net).train().requires_grad_(True)


def with_guidance_input(net: nn.Module) -> nn.Module:
    """A trainable copy of a teacher U-Net that also takes the guidance weight cond["w"] as an
    input; the new embedding starts at zero, so the copy computes the teacher's function."""
    from difflab.nets.unet import UNet

    if type(net) is not UNet:
        raise ValueError(f"guidance distillation needs a UNet teacher (for the w-embedding), got {type(net).__name__}")
    student = UNet(net.config, guidance_embedding=True)
    missing, unexpected = student.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not key.startswith("guidance_embed.") for key in missing):
        raise ValueError(f"teacher weights do not fit the student: missing {missing}, unexpected {unexpected}")
    return student.train().requires_grad_(True)


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

