"""unCLIP's diffusion prior network (Ramesh et al. 2022, section 2.2): predicts the clean CLIP
image embedding from a noisy one, conditioned on the caption.

A small transformer reads the sequence [caption tokens, text embedding, time embedding, noisy
image embedding, learned query] and the query's output is the prediction (x0-prediction, as the
paper: the embedding itself, not the noise). It works on *standardised* embeddings
(:class:`EmbeddingStandardizer`): CLIP embeddings are unit vectors whose coordinates are
~1/sqrt(D) in size, far too small against unit Gaussian noise, so the signal would vanish in the
first steps of the chain. The standardiser's mean and std are buffers of the network, so they are
saved and loaded with its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import ConfigModule, NetConfig, check_cond, check_int, check_probability, prepare_timesteps, require_cond
from .layers import TimestepEmbedding
from .text import TransformerBlock

PRIOR_COND = ("text_tokens", "text_mask", "text_embed")


class EmbeddingStandardizer(nn.Module):
    """z = (e - mean) / std per coordinate, and back. `fit` takes the statistics from a set of
    training embeddings; they are buffers, so they travel with the network's state_dict."""

    def __init__(self, dim: int):
        super().__init__()
        check_int("dim", dim, 1)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, embeddings: Tensor, min_std: float = 1e-4) -> EmbeddingStandardizer:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.mean.shape[0] or embeddings.shape[0] < 2:
            raise ValueError(
                f"fit needs (N >= 2, {self.mean.shape[0]}) embeddings, got {tuple(embeddings.shape)}"
            )
        self.mean.copy_(embeddings.mean(0))
        self.std.copy_(embeddings.std(0).clamp(min=min_std))
        return self

    def forward(self, e: Tensor) -> Tensor:
        return (e - self.mean) / self.std

    def inverse(self, z: Tensor) -> Tensor:
        return z * self.std + self.mean


@dataclass(frozen=True)
class PriorConfig(NetConfig):
    """embed_dim: the CLIP space; token_dim: the width of CLIP's text tokens; max_tokens: at most
    this many caption tokens; dim/depth/num_heads/mlp_ratio: the transformer."""

    embed_dim: int = 64
    token_dim: int = 64
    max_tokens: int = 24
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def validate(self) -> None:
        for name, minimum in (("embed_dim", 1), ("token_dim", 1), ("max_tokens", 1), ("dim", 2), ("depth", 1),
                              ("num_heads", 1), ("mlp_ratio", 1)):  # fmt: skip
            check_int(name, getattr(self, name), minimum)
        check_probability("dropout", self.dropout, allow_one=False)
        if self.dim % self.num_heads or self.dim % 2:
            raise ValueError(f"dim {self.dim} must be even and divisible by num_heads={self.num_heads}")


class DiffusionPrior(ConfigModule):
    """``forward(z_t, t, cond)`` -> predicted clean standardised embedding (B, embed_dim), with
    cond = {"text_tokens" (B, L, token_dim), "text_mask" (B, L) bools, "text_embed" (B, embed_dim)}
    from the frozen CLIP. ``standardizer`` maps CLIP embeddings to the space z lives in."""

    config_class = PriorConfig
    config: PriorConfig
    accepted_cond = PRIOR_COND

    def __init__(self, config: PriorConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        self.standardizer = EmbeddingStandardizer(cfg.embed_dim)
        self.token_in = nn.Linear(cfg.token_dim, cfg.dim)
        self.text_embed_in = nn.Linear(cfg.embed_dim, cfg.dim)
        self.x_in = nn.Linear(cfg.embed_dim, cfg.dim)
        self.time_embed = TimestepEmbedding(cfg.dim, cfg.dim)
        self.query = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_tokens + 4, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.embed_dim)

    def forward(self, x: Tensor, t: Any, cond: dict | None = None) -> Tensor:
        cfg = self.config
        cond = check_cond(cond, PRIOR_COND, "DiffusionPrior")
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != cfg.embed_dim:
            got = getattr(x, "shape", x)
            raise ValueError(f"DiffusionPrior takes (B, {cfg.embed_dim}) noisy embeddings, got {got}")
        batch = x.shape[0]
        tokens = require_cond(cond, "text_tokens", "DiffusionPrior", "CLIP's caption tokens")
        mask = cond.get("text_mask")
        text_embed = require_cond(cond, "text_embed", "DiffusionPrior", "CLIP's text embedding")
        if tokens.ndim != 3 or tokens.shape[0] != batch or tokens.shape[2] != cfg.token_dim:
            raise ValueError(f'cond["text_tokens"] must be ({batch}, L, {cfg.token_dim}), got {tuple(tokens.shape)}')
        if tokens.shape[1] > cfg.max_tokens:
            raise ValueError(f"{tokens.shape[1]} caption tokens; this prior takes at most max_tokens={cfg.max_tokens}")
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)
        if tuple(text_embed.shape) != (batch, cfg.embed_dim):
            raise ValueError(f'cond["text_embed"] must be ({batch}, {cfg.embed_dim}), got {tuple(text_embed.shape)}')
        dtype = self.x_in.weight.dtype
        t_emb = self.time_embed(prepare_timesteps(t, batch, x.device))
        rest = torch.stack(
            [self.text_embed_in(text_embed.to(dtype)), t_emb, self.x_in(x.to(dtype)), self.query.expand(batch, -1)],
            dim=1,
        )
        words = self.token_in(tokens.to(dtype)) + self.pos_embed[: tokens.shape[1]]
        h = torch.cat([words, rest + self.pos_embed[cfg.max_tokens :]], dim=1)  # the last four: fixed positions
        keys = torch.cat([mask.bool(), torch.ones(batch, 4, dtype=torch.bool, device=x.device)], dim=1)
        for block in self.blocks:
            h = block(h, keys)
        return self.out(self.norm(h[:, -1]))
