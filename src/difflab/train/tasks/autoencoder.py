"""Perceptual compression, latent diffusion's first stage: an autoencoder (and optionally its
patch discriminator) trained together; the export is what `[latent] autoencoder = RUN` reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difflab.train.config import Config
from difflab.train.distributed import Dist

if TYPE_CHECKING:
    from difflab.train.tasks import DataInfo

AUTOENCODER_FILE = "autoencoder.json"
AUTOENCODER_FORMAT = "difflab-autoencoder"


class AutoencoderTask:
    """The `Autoencoder` of [model] and, if [model.discriminator] is given, a
    `PatchDiscriminator`, trained together as one `AutoencoderGAN` (one optimizer: their
    gradients do not mix; keep train.grad_clip = 0 so the clipping does not couple them).
    [model.loss] holds `AutoencoderLossConfig`'s weights; the GAN terms start at
    loss.disc_start, counted in optimizer steps; loss.perceptual_weight > 0 adds LPIPS
    (backbone [model] lpips_net, default "vgg") from weights already on the machine. The
    sample grid shows the first training images above their reconstructions. The export is
    the autoencoder alone plus autoencoder.json; a diffusion recipe with
    `[latent] autoencoder = RUN` trains on its latents."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.methods.latent import AutoencoderGAN, load_lpips
        from difflab.nets import Autoencoder, build_network

        model = dict(config.model)
        discriminator, loss = model.pop("discriminator", None), model.pop("loss", {})
        loss_net = model.pop("lpips_net", "vgg")
        autoencoder = build_network(model)
        if not isinstance(autoencoder, Autoencoder):
            kind = type(autoencoder).__name__
            raise ValueError(f'task "autoencoder" needs [model] class = "Autoencoder", got {kind}')
        channels = autoencoder.config.in_channels
        if len(data.sample_shape) != 3 or data.sample_shape[0] != channels:
            raise ValueError(f"the autoencoder takes {channels}-channel images; the data's examples have shape "
                             f"{data.sample_shape}")  # fmt: skip
        autoencoder.latent_shape(*data.sample_shape[1:])  # the image size must be a multiple of f
        critic = None if discriminator is None else _build_discriminator(discriminator, channels)
        loss = _loss_config(loss)
        perceptual = load_lpips(loss_net) if loss.perceptual_weight > 0 else None
        self.config, self.data, self.step = config, data, 0
        self.model = AutoencoderGAN(autoencoder, critic, loss, perceptual)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        return model(batch["x"], self.step, generator)

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        device = next(model.parameters()).device
        x = self.data.examples[: max(1, n // 2)].to(device)
        return torch.cat([x, model.autoencoder(x, sample_posterior=False).reconstruction.clamp(-1, 1)])

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def metadata(self, autoencoder: nn.Module) -> dict:
        return {
            "format": AUTOENCODER_FORMAT,
            "version": 1,
            "image_shape": list(self.data.sample_shape),
            "latent_shape": list(autoencoder.latent_shape(*self.data.sample_shape[1:])),
            "downsampling_factor": autoencoder.downsampling_factor,
            "regularization": autoencoder.config.regularization,
            "data": dict(self.config.data),
        }

    def export(self, model: nn.Module, directory: Path) -> None:
        model.autoencoder.save_pretrained(directory)
        meta = json.dumps(self.metadata(model.autoencoder), indent=2) + "\n"
        (Path(directory) / AUTOENCODER_FILE).write_text(meta, encoding="utf-8")


def _build_discriminator(config: dict, in_channels: int) -> nn.Module:
    from difflab.nets import PatchDiscriminator

    if not isinstance(config, dict):
        raise ValueError(f"[model.discriminator] must be a table of PatchDiscriminator settings, got {config!r}")
    config = {"in_channels": in_channels, **config}
    kind = config.pop("class", "PatchDiscriminator")
    if kind != "PatchDiscriminator":
        raise ValueError(f'[model.discriminator] class must be "PatchDiscriminator", got {kind!r}')
    return PatchDiscriminator(config)


def _loss_config(values: dict):
    from dataclasses import fields

    from difflab.methods.latent import AutoencoderLossConfig

    allowed = [f.name for f in fields(AutoencoderLossConfig)]
    if not isinstance(values, dict) or set(values) - set(allowed):
        unknown = sorted(set(values) - set(allowed)) if isinstance(values, dict) else values
        raise ValueError(f"[model.loss] has unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return AutoencoderLossConfig(**values)
