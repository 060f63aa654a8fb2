"""Noisy-image classifier p(y | x_t, t) for classifier guidance (ADM).

The U-Net's encoder half (time-conditioned res blocks + attention + middle block)
followed by GroupNorm, SiLU and attention pooling to logits. Every op is smooth
(SiLU, GroupNorm, softmax attention, average pooling or strided conv), so
grad_x log p(y | x_t, t) exists and is what guidance follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import (
    ConfigModule,
    check_cond,
    check_image,
    check_int,
    prepare_timesteps,
)
from .layers import AttentionPool2d, TimestepEmbedding
from .unet import BackboneConfig, UNetEncoder, block_factory


@dataclass(frozen=True)
class NoisyClassifierConfig(BackboneConfig):
    """Backbone fields mean the same as in :class:`~difflab.nets.unet.UNetConfig`.

    image_size is fixed because the attention pool has a learned position per pixel
    of the final feature map. Attention heads of the pool follow num_heads /
    num_head_channels like the other attention layers.
    """

    image_size: int = 32
    num_classes: int = 10

    def validate(self) -> None:
        super().validate()
        check_int("image_size", self.image_size, 1)
        check_int("num_classes", self.num_classes, 1)
        levels = len(self.channel_mult) - (0 if self.efficient_updown else 1)
        if self.image_size % 2**levels:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of {2**levels} "
                f"(the encoder's total downsampling)"
            )
        width = self.model_channels * self.channel_mult[-1]
        divisor = self.num_heads if self.num_head_channels is None else self.num_head_channels
        if width % divisor:
            raise ValueError(
                f"pool attention width {width} is not divisible by "
                f"{'num_heads' if self.num_head_channels is None else 'num_head_channels'}"
                f"={divisor}"
            )


class NoisyClassifier(ConfigModule):
    """``forward(x, t, cond=None) -> logits (B, num_classes)``; cond must be empty."""

    config_class = NoisyClassifierConfig
    config: NoisyClassifierConfig

    def __init__(self, config: NoisyClassifierConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        embed_dim = 4 * cfg.model_channels
        self.time_embed = TimestepEmbedding(cfg.model_channels, embed_dim)
        blocks = block_factory(cfg, embed_dim)
        self.encoder = UNetEncoder(cfg, cfg.in_channels, blocks)
        channels = self.encoder.out_channels
        self.out_norm = nn.GroupNorm(cfg.norm_groups, channels)
        self.pool = AttentionPool2d(
            cfg.image_size // self.encoder.out_factor, channels, blocks.heads(channels),
            cfg.num_classes,
        )

    def forward(self, x: torch.Tensor, t: Any, cond: dict | None = None) -> torch.Tensor:
        cfg = self.config
        check_cond(cond, (), "NoisyClassifier", "it is conditioned on x and t only")
        check_image(x, cfg.in_channels, "NoisyClassifier")
        if x.shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"NoisyClassifier was built for {cfg.image_size}x{cfg.image_size} inputs, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        emb = self.time_embed(prepare_timesteps(t, x.shape[0], x.device))
        h, _ = self.encoder(x, emb)
        return self.pool(nn.functional.silu(self.out_norm(h)))
