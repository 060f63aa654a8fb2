"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify (p x p conv, stride p) + fixed 2-D sin-cos positions -> transformer blocks
conditioned by adaLN-Zero on c = emb(t) + emb(y) -> adaLN final layer -> unpatchify.
adaLN-Zero gates start at 0, so every block is the identity and (with the zeroed
final layer) a fresh model predicts exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import (
    ConfigModule,
    NetConfig,
    check_bool,
    check_cond,
    check_image,
    check_int,
    check_optional_int,
    check_probability,
    prepare_timesteps,
    require_cond,
)
from .layers import LabelEmbedding, SelfAttention, TimestepEmbedding, zero_module


@dataclass(frozen=True)
class DiTConfig(NetConfig):
    """DiT settings; see :func:`dit_config` for the paper's presets.

    input_size: H = W of the (latent) input. out_channels: predicted data channels
    (default in_channels); learn_sigma doubles them (first half: mean prediction, second
    half: variance interpolation v). class_dropout_prob: DiT's label dropout, the rate
    at which the training task replaces labels by the null label (the network itself
    never drops them). concat_channels: extra input channels from ``cond["concat"]``.
    """

    input_size: int = 32
    patch_size: int = 4
    in_channels: int = 4
    out_channels: int | None = None
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    class_dropout_prob: float = 0.0
    learn_sigma: bool = False
    concat_channels: int = 0
    frequency_embedding_size: int = 256

    def validate(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                     "num_heads", "frequency_embedding_size"):
            check_int(name, getattr(self, name), 1)
        check_optional_int("out_channels", self.out_channels, 1)
        check_optional_int("num_classes", self.num_classes, 1)
        check_probability("class_dropout_prob", self.class_dropout_prob)
        check_bool("learn_sigma", self.learn_sigma)
        check_int("concat_channels", self.concat_channels, 0)
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, int | float):
            raise ValueError(f"mlp_ratio must be a number, got {self.mlp_ratio!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size must be a multiple of 4 for the 2-D sin-cos embedding, "
                f"got {self.hidden_size}"
            )


# Table 1 of the paper: (depth, hidden size, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PATCHES = (2, 4, 8)
DIT_PRESETS = tuple(f"DiT-{size}/{p}" for size in DIT_SIZES for p in DIT_PATCHES)


def dit_config(name: str, **overrides: Any) -> DiTConfig:
    """Paper preset (32x32x4 latents, 1000 classes, learned sigma) with optional overrides.

    ``dit_config("DiT-S/4", input_size=32, in_channels=3, num_classes=None)``.
    """
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose from {list(DIT_PRESETS)}")
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = DIT_SIZES[size]
    preset = dict(
        input_size=32, patch_size=int(patch), in_channels=4, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=4.0, num_classes=1000, learn_sigma=True,
    )
    return DiTConfig.from_dict({**preset, **overrides})


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) = [sin(p * w_i), cos(p * w_i)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) fixed position table for row-major tokens.

    The first half encodes the column, the second the row (the MAE/DiT layout, so
    official DiT weights would see the positions they were trained with).
    """
    index = torch.arange(grid_size * grid_size)
    rows, cols = index // grid_size, index % grid_size
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


COND_HINT = (
    'DiT supports "y" (when num_classes is set) and "concat" (when concat_channels is set); '
    "it has no cross-attention context or control residuals"
)


def _xavier_linears(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm transformer block; adaLN-Zero turns c into shift/scale/gate per branch."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attention = SelfAttention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden),
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        _xavier_linears(self)
        zero_module(self.modulation)  # adaLN-Zero: gates start at 0, the block is the identity

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiTFinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its p*p*C patch."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        zero_module(self.modulation)
        zero_module(self.linear)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(ConfigModule):
    """``forward(x, t, cond=None) -> (B, output_channels, input_size, input_size)``."""

    config_class = DiTConfig
    config: DiTConfig

    def __init__(self, config: DiTConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        data_channels = cfg.out_channels or cfg.in_channels
        self.output_channels = data_channels * (2 if cfg.learn_sigma else 1)
        self.grid_size = cfg.input_size // cfg.patch_size
        hidden = cfg.hidden_size
        self.patch_embed = nn.Conv2d(
            cfg.in_channels + cfg.concat_channels, hidden, cfg.patch_size, stride=cfg.patch_size
        )
        # Fixed, recomputed at construction: not a parameter and not saved.
        self.register_buffer("pos_embed", sincos_2d(hidden, self.grid_size)[None], persistent=False)
        self.time_embed = TimestepEmbedding(cfg.frequency_embedding_size, hidden)
        self.label_embed = (
            LabelEmbedding(cfg.num_classes, hidden)
            if cfg.num_classes is not None
            else None
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.final_layer = DiTFinalLayer(hidden, cfg.patch_size, self.output_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The paper's init for the embedders (blocks and final layer init themselves)."""
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.embedding.weight, std=0.02)
        for index in (0, 2):
            nn.init.normal_(self.time_embed.mlp[index].weight, std=0.02)
            nn.init.zeros_(self.time_embed.mlp[index].bias)

    @property
    def accepted_cond(self) -> tuple[str, ...]:
        keys = ["y"] if self.config.num_classes is not None else []
        return (*keys, "concat") if self.config.concat_channels else tuple(keys)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W); each token holds its patch as (p, p, C)."""
        batch, p, g = tokens.shape[0], self.config.patch_size, self.grid_size
        x = tokens.reshape(batch, g, g, p, p, self.output_channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, self.output_channels, g * p, g * p)

    def forward(self, x: torch.Tensor, t: Any, cond: dict | None = None) -> torch.Tensor:
        cfg = self.config
        cond = check_cond(cond, self.accepted_cond, "DiT", COND_HINT)
        check_image(x, cfg.in_channels, "DiT")
        if x.shape[2:] != (cfg.input_size, cfg.input_size):
            raise ValueError(
                f"DiT was built for {cfg.input_size}x{cfg.input_size} inputs, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        batch = x.shape[0]
        if cfg.concat_channels:
            extra = require_cond(cond, "concat", "DiT", f"concat_channels={cfg.concat_channels}")
            expected = (batch, cfg.concat_channels, *x.shape[2:])
            if not isinstance(extra, torch.Tensor) or tuple(extra.shape) != expected:
                got = tuple(extra.shape) if isinstance(extra, torch.Tensor) else type(extra)
                raise ValueError(f'cond["concat"] must have shape {expected}, got {got}')
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.time_embed(prepare_timesteps(t, batch, x.device))
        if self.label_embed is not None:
            y = require_cond(cond, "y", "DiT", f"num_classes={cfg.num_classes}")
            c = c + self.label_embed(y, batch)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


