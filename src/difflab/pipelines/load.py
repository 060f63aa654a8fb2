"""Rebuild a model's components from its folder: the denoiser (network + schedule +
parameterisation; a ControlNet's base joined with its control branch) and, for a latent model,
the decoder. Needs no training code, no pickle."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from difflab.denoiser import Denoiser, build_denoiser
from difflab.devices import warn_if_slow
from difflab.pipelines.folder import AUTOENCODER, CONTROL, DENOISER, component_dir, read_manifest, resolve
from difflab.schedules import Schedule


def load_pipeline(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Denoiser, dict]:
    """The raw denoiser of a model (network in eval mode on `device`, in `dtype` if given) and
    its manifest. `path`: a model folder, a run folder or a shipped model's name. The raw
    denoiser applies no thresholding or guidance: `Pipeline` (or `guidance.conditioned`) adds
    what the manifest says."""
    from difflab.interop.diffusers import is_diffusers_unet, load_diffusers_unet
    from difflab.nets import load_network

    directory = resolve(path)
    manifest = read_manifest(directory)
    folder = component_dir(directory, manifest, DENOISER)
    if is_diffusers_unet(folder):  # a diffusers folder's unet/, converted on load
        net = load_diffusers_unet(folder, manifest, device=device)
    else:
        net = load_network(folder, device=device)
    if manifest.get("control") is not None:  # a ControlNet: the locked base joined with its control branch
        from difflab.nets.controlnet import ControlledUNet

        net = ControlledUNet(net, load_network(component_dir(directory, manifest, CONTROL), device=device)).eval()
    if dtype is not None:
        warn_if_slow(device, dtype)
        net = net.to(dtype)
    schedule = Schedule.from_config(manifest["schedule"])
    options = manifest.get("denoiser_options") or {}  # e.g. a consistency model's sigma_data
    denoiser = build_denoiser(
        net, schedule, manifest["prediction"], manifest["variance"], tuple(manifest["sample_shape"]), **options
    )
    return denoiser, manifest


class LatentDecoder:
    """Latents -> images with a latent model's autoencoder (latents scaled as in training).
    Takes latents of any float dtype and device; returns float32 images."""

    def __init__(self, autoencoder: torch.nn.Module):
        self.autoencoder = autoencoder.eval()

    @torch.no_grad()
    def __call__(self, z: Tensor) -> Tensor:
        weight = next(self.autoencoder.parameters())
        return self.autoencoder.decode_scaled(z.to(weight.device, weight.dtype)).float()

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LatentDecoder:
        self.autoencoder.to(device=device, dtype=dtype)
        return self


def load_decoder(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LatentDecoder | None:
    """What turns a model's samples into images: a `LatentDecoder` for a latent model (checked
    against the scale factor its latents were trained with), None for a pixel model."""
    from difflab.methods.latent import load_autoencoder

    directory = resolve(path)
    manifest = read_manifest(directory)
    latent = manifest.get("latent")
    if latent is None:
        return None
    folder = component_dir(directory, manifest, AUTOENCODER)
    autoencoder = load_autoencoder(folder, device=device)
    if not math.isclose(float(autoencoder.scale_factor), latent["scale_factor"], rel_tol=1e-6):
        raise ValueError(
            f"{folder} has scale factor {float(autoencoder.scale_factor)} but the model was trained on latents "
            f"scaled by {latent['scale_factor']}"
        )
    return LatentDecoder(autoencoder).to(dtype=dtype)
