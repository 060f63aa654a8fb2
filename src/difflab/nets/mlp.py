"""A residual MLP denoiser for vector data (the 2-D toy sets): what a U-Net is to images.

x (B, D) and t -> sinusoidal time embedding -> residual blocks whose hidden units are
shifted and scaled by the embedding -> (B, D). The output layer starts at zero, so a fresh
model predicts exactly 0, like the other networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import ConfigModule, NetConfig, check_cond, check_int, check_optional_int, prepare_timesteps, require_cond
from .layers import LabelEmbedding, TimestepEmbedding, zero_module


@dataclass(frozen=True)
class MLPConfig(NetConfig):
    """in_features: data dimension D. num_classes: optional class conditioning (label
    `num_classes` is the null label for classifier-free guidance)."""

    in_features: int = 2
    hidden: int = 128
    depth: int = 3
    frequency_dim: int = 64
    num_classes: int | None = None

    def validate(self) -> None:
        for name in ("in_features", "hidden", "depth", "frequency_dim"):
            check_int(name, getattr(self, name), 1)
        check_optional_int("num_classes", self.num_classes, 1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.modulation = nn.Linear(hidden, 2 * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(emb).chunk(2, dim=1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class MLP(ConfigModule):
    config_class = MLPConfig

    def __init__(self, config: MLPConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        c = self.config
        self.time_embed = TimestepEmbedding(c.frequency_dim, c.hidden)
        self.label_embed = LabelEmbedding(c.num_classes, c.hidden) if c.num_classes else None
        self.proj_in = nn.Linear(c.in_features, c.hidden)
        self.blocks = nn.ModuleList(ResidualBlock(c.hidden) for _ in range(c.depth))
        self.proj_out = zero_module(nn.Linear(c.hidden, c.in_features))

    def forward(self, x: torch.Tensor, t: Any, cond: dict | None = None) -> torch.Tensor:
        c = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != c.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MLP expects x of shape (B, {c.in_features}), got {shape}")
        cond = check_cond(cond, ("y",) if self.label_embed else (), "MLP", "set num_classes for 'y'")
        emb = self.time_embed(prepare_timesteps(t, x.shape[0], x.device))
        if self.label_embed is not None:
            emb = emb + self.label_embed(require_cond(cond, "y", "MLP", "num_classes is set"), x.shape[0])
        emb = nn.functional.silu(emb)
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(h)
