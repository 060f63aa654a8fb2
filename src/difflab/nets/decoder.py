"""unCLIP's decoder network P(x | c_i, y) (Ramesh et al. 2022, section 2.1): a U-Net conditioned
on a CLIP image embedding c_i two ways, as the paper (after GLIDE) does: projected and added to
the time embedding (so every res block sees it) and projected to `num_image_tokens` extra
context tokens that cross-attention reads beside the (optional) caption tokens.

The null image embedding of classifier-free guidance is the zero vector: CLIP embeddings are
unit vectors, so zero is never a real one. The task drops it (and, independently, the caption)
per example; the network never alters its condition itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .base import ConfigModule, NetConfig, build_network, check_cond, check_int, require_cond


@dataclass(frozen=True)
class UnCLIPDecoderConfig(NetConfig):
    """unet: the U-Net's settings (its image_embed_dim and context_dim are set here); image_embed_dim:
    the CLIP space; num_image_tokens: K context tokens made from the embedding; context_dim: the
    width of the context tokens (the text encoder's dim when there is one); text_encoder: a
    TextEncoder's settings for the caption tokens, or {} for a decoder without captions;
    embed_scale: the embedding is multiplied by sqrt(image_embed_dim) before it is projected
    (true) so that its components, ~1/sqrt(D) in a unit vector, reach unit scale like the
    network's other inputs."""

    unet: dict = field(default_factory=dict)
    image_embed_dim: int = 64
    num_image_tokens: int = 4
    context_dim: int = 64
    text_encoder: dict = field(default_factory=dict)
    embed_scale: bool = True

    def validate(self) -> None:
        if not isinstance(self.unet, dict) or not isinstance(self.text_encoder, dict):
            raise ValueError("unet and text_encoder must be dicts of settings")
        for name in ("image_embed_dim", "num_image_tokens", "context_dim"):
            check_int(name, getattr(self, name), 1)
        for key in ("image_embed_dim", "context_dim"):
            if key in self.unet and self.unet[key] != getattr(self, key):
                raise ValueError(f"unet.{key} = {self.unet[key]!r} must equal the decoder's {key} or be left out")


class UnCLIPDecoder(ConfigModule):
    """``forward(x, t, cond)`` with cond["image_embed"] (B, D) and, with a text encoder,
    cond["caption"] (B strings; "" is the null caption)."""

    config_class = UnCLIPDecoderConfig
    config: UnCLIPDecoderConfig

    def __init__(self, config: UnCLIPDecoderConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        self.text_encoder = None
        if cfg.text_encoder:
            self.text_encoder = build_network({"class": "TextEncoder", "dim": cfg.context_dim, **cfg.text_encoder})
            if self.text_encoder.output_dim != cfg.context_dim:
                raise ValueError(
                    f"the text encoder outputs {self.text_encoder.output_dim}-d tokens but context_dim = "
                    f"{cfg.context_dim}; set them equal"
                )
        self.image_tokens = nn.Linear(cfg.image_embed_dim, cfg.num_image_tokens * cfg.context_dim)
        unet = {"class": "UNet", **cfg.unet, "image_embed_dim": cfg.image_embed_dim, "context_dim": cfg.context_dim}
        self.unet = build_network(unet)

    @property
    def accepted_cond(self) -> tuple[str, ...]:
        keys = ("image_embed", "caption") if self.text_encoder is not None else ("image_embed",)
        rest = [k for k in self.unet.accepted_cond if k not in ("image_embed", "context", "context_mask")]
        return (*keys, *rest)

    def context(self, image_embed: Tensor, captions: Sequence[str] | None) -> tuple[Tensor, Tensor]:
        batch, cfg = image_embed.shape[0], self.config
        tokens = self.image_tokens(image_embed).view(batch, cfg.num_image_tokens, cfg.context_dim)
        mask = torch.ones(batch, cfg.num_image_tokens, dtype=torch.bool, device=tokens.device)
        if self.text_encoder is None:
            return tokens, mask
        if captions is None or isinstance(captions, str) or len(captions) != batch:
            raise ValueError(f'UnCLIPDecoder needs cond["caption"]: a list of {batch} strings ("" = none)')
        text = self.text_encoder.encode(list(captions), device=tokens.device)
        return torch.cat([tokens, text["context"].to(tokens.dtype)], 1), torch.cat([mask, text["context_mask"]], 1)

    def forward(self, x: Tensor, t: Any, cond: dict | None = None) -> Tensor:
        cond = check_cond(cond, self.accepted_cond, "UnCLIPDecoder")
        embed = require_cond(cond, "image_embed", "UnCLIPDecoder", "the CLIP image embedding; zeros = none")
        if not isinstance(embed, Tensor) or tuple(embed.shape) != (x.shape[0], self.config.image_embed_dim):
            raise ValueError(
                f'cond["image_embed"] must be ({x.shape[0]}, {self.config.image_embed_dim}), '
                f"got {getattr(embed, 'shape', embed)}"
            )
        embed = embed.to(self.image_tokens.weight.dtype)
        if self.config.embed_scale:
            embed = embed * self.config.image_embed_dim**0.5
        context, mask = self.context(embed, cond.pop("caption", None))
        return self.unet(x, t, {**cond, "image_embed": embed, "context": context, "context_mask": mask})
