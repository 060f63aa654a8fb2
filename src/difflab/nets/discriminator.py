"""PatchGAN discriminator and the GAN pieces of autoencoder training (pix2pix, VQGAN, LDM).

A PatchGAN judges overlapping patches rather than the whole image: it outputs a map of
logits, one per receptive field, so it pushes the decoder towards locally realistic
texture, which pixel losses blur. The GAN term uses the hinge loss, weighted by the
adaptive weight of Esser et al. (2021), which balances it against the reconstruction
loss by their gradient norms at the decoder's last layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ConfigModule, NetConfig, check_image, check_int

NORMS = ("batch", "none")


@dataclass(frozen=True)
class PatchDiscriminatorConfig(NetConfig):
    """num_layers stride-2 convs (the first without norm), one stride-1 conv, a 1-channel
    conv: an H x W input gives an (H / 2^num_layers - 2) x (W / 2^num_layers - 2) logit map.
    Widths double per layer from base_channels, capped at 8 * base_channels."""

    in_channels: int = 3
    base_channels: int = 64
    num_layers: int = 3
    norm: str = "batch"

    def validate(self) -> None:
        check_int("in_channels", self.in_channels, 1)
        check_int("base_channels", self.base_channels, 1)
        check_int("num_layers", self.num_layers, 1)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")


class PatchDiscriminator(ConfigModule):
    """``forward(x) -> (B, 1, h, w)`` logits: > 0 means "looks real" for that patch."""

    config_class = PatchDiscriminatorConfig
    config: PatchDiscriminatorConfig

    def __init__(self, config: PatchDiscriminatorConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        widths = [cfg.base_channels * min(2**i, 8) for i in range(cfg.num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.num_layers + 1):
            stride = 2 if i < cfg.num_layers else 1
            layers += self._conv_norm_act(widths[i - 1], widths[i], stride)
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_pix2pix_init)

    def _conv_norm_act(self, in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
        batch_norm = self.config.norm == "batch"
        conv = nn.Conv2d(in_channels, out_channels, 4, stride=stride, padding=1, bias=not batch_norm)
        norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        return [conv, norm, nn.LeakyReLU(0.2)]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the logit map for an H x W input."""
        n = self.config.num_layers
        return (height // 2**n - 2, width // 2**n - 2)

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.config.in_channels, "PatchDiscriminator")
        if min(self.output_size(x.shape[2], x.shape[3])) < 1:
            smallest = 3 * 2**self.config.num_layers
            raise ValueError(
                f"PatchDiscriminator with num_layers={self.config.num_layers} needs H and W >= {smallest}, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        return self.layers(x)


def _pix2pix_init(module: nn.Module) -> None:
    """N(0, 0.02) conv weights, N(1, 0.02) norm scales: the DCGAN/pix2pix initialisation."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- losses


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss per example, (B,): 0.5 * (mean relu(1 - real) + mean relu(1 + fake)).

    Zero once real patches score >= 1 and fake ones <= -1, so D stops pushing past the margin.
    """
    _check_logits(logits_real, "logits_real")
    _check_logits(logits_fake, "logits_fake")
    real = F.relu(1.0 - logits_real).flatten(1).mean(1)
    fake = F.relu(1.0 + logits_fake).flatten(1).mean(1)
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator loss per example, (B,): -mean(logits of the reconstruction)."""
    _check_logits(logits_fake, "logits_fake")
    return -logits_fake.flatten(1).mean(1)


def _check_logits(logits: Any, name: str) -> None:
    if not isinstance(logits, Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a float tensor with a batch dimension, got {got}")


def gan_active(step: int, disc_start: int) -> bool:
    """The GAN terms are off for the first ``disc_start`` steps (the autoencoder learns to
    reconstruct first; a discriminator facing blurry early outputs wins too easily)."""
    check_int("step", step, 0)
    check_int("disc_start", disc_start, 0)
    return step >= disc_start


def adaptive_weight(
    reconstruction_loss: Tensor, generator_loss: Tensor, last_layer: Tensor, *, max_weight: float = 1e4
) -> Tensor:
    """lambda = ||grad_last L_rec|| / (||grad_last L_G|| + 1e-4), clamped to [0, max_weight], detached.

    Scales the GAN term so its gradient at the decoder's last layer is as large as the
    reconstruction term's, whatever the two losses' units. Both losses must be scalars
    whose graphs reach ``last_layer`` (the graphs are kept for the real backward pass).
    """
    for name, loss in (("reconstruction_loss", reconstruction_loss), ("generator_loss", generator_loss)):
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(f"{name} must be a scalar tensor with a graph reaching last_layer")
    (rec_grad,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
