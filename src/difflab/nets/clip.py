"""A CLIP-style contrastive encoder (Radford et al. 2021), small enough to train on a laptop CPU:
an image tower and a text tower mapped into one L2-normalised space, trained with a symmetric
InfoNCE loss at a learned temperature. unCLIP uses it frozen: its image embedding is what the
prior predicts and the decoder is conditioned on.

- image tower: stride-2 convolutions (with pixel-coordinate channels, so "at the top left" has
  somewhere to go) then a linear map of the flattened features, not a global average pool,
  which would throw position away;
- text tower: the word-level :class:`~difflab.nets.text.TextEncoder`, its masked mean token
  projected to the shared space; its tokens are also what the prior attends to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ConfigModule, NetConfig, build_network, check_image, check_int, check_int_tuple
from .unet import coordinate_maps, masked_mean

CLIP_FILE = "clip.json"  # beside an exported encoder's weights: marks the folder as one
CLIP_FORMAT = "difflab-clip"


@dataclass(frozen=True)
class CLIPConfig(NetConfig):
    """image_size/in_channels: the images; channels: one stride-2 conv per entry; embed_dim: the
    shared space; text_encoder: the TextEncoder's settings; init_temperature: tau at the start
    (CLIP: 0.07); max_logit_scale: 1/tau is clamped to it (CLIP: 100), so training cannot
    blow the logits up."""

    image_size: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 64)
    embed_dim: int = 64
    text_encoder: dict = field(default_factory=dict)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def validate(self) -> None:
        check_int("image_size", self.image_size, 1)
        check_int("in_channels", self.in_channels, 1)
        check_int("embed_dim", self.embed_dim, 1)
        check_int_tuple("channels", self.channels, 1, allow_empty=False)
        if self.image_size % (2 ** len(self.channels)):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2^len(channels) = {2 ** len(self.channels)}"
            )
        if not isinstance(self.text_encoder, dict):
            raise ValueError(f"text_encoder must be a dict of TextEncoder settings, got {self.text_encoder!r}")
        for name in ("init_temperature", "max_logit_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if 1.0 / self.init_temperature > self.max_logit_scale:
            raise ValueError(f"1 / init_temperature = {1 / self.init_temperature} exceeds max_logit_scale")


class ImageTower(nn.Module):
    """(B, C, H, W) -> (B, dim) features (not normalised)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        layers, width = [], cfg.in_channels + 2
        for out in cfg.channels:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(min(8, out), out), nn.SiLU()]
            width = out
        self.convs = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.head = nn.Linear(width * side * side, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.convs(torch.cat([x, coordinate_maps(x)], dim=1))
        return self.head(h.flatten(1))


class CLIP(ConfigModule):
    """``encode_image(x)`` and ``encode_text(captions)`` give unit vectors (B, embed_dim);
    ``text_tokens(captions)`` gives the text tower's tokens too; ``forward(x, captions)`` ->
    (image_emb, text_emb, logit_scale) for :func:`clip_loss`."""

    config_class = CLIPConfig
    config: CLIPConfig

    def __init__(self, config: CLIPConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        self.image_tower = ImageTower(cfg)
        self.text_encoder = build_network({"class": "TextEncoder", **cfg.text_encoder})
        self.text_proj = nn.Linear(self.text_encoder.output_dim, cfg.embed_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def token_dim(self) -> int:
        return self.text_encoder.output_dim

    def logit_scale(self) -> Tensor:
        """1 / temperature, clamped to max_logit_scale."""
        return self.log_logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def encode_image(self, x: Tensor) -> Tensor:
        check_image(x, self.config.in_channels, "CLIP")
        size = self.config.image_size
        if tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"CLIP takes {size}x{size} images, got {tuple(x.shape[-2:])}")
        return F.normalize(self.image_tower(x), dim=-1)

    def text_tokens(self, captions: Sequence[str]) -> dict:
        """{"embed": (B, D) unit vectors, "tokens": (B, L, token_dim), "mask": (B, L) bools}."""
        encoded = self.text_encoder.encode(list(captions), device=self.log_logit_scale.device)
        tokens, mask = encoded["context"], encoded["context_mask"]
        embed = F.normalize(self.text_proj(masked_mean(tokens, mask)), dim=-1)
        return {"embed": embed, "tokens": tokens, "mask": mask}

    def encode_text(self, captions: Sequence[str]) -> Tensor:
        return self.text_tokens(captions)["embed"]

    def forward(self, x: Tensor, captions: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        if isinstance(captions, str) or len(captions) != x.shape[0]:
            raise ValueError(f"CLIP needs one caption per image ({x.shape[0]}), got {captions!r}")
        return self.encode_image(x), self.encode_text(captions), self.logit_scale()


def same_caption(captions: Sequence[str]) -> Tensor:
    """(B, B) bools: True where two examples have the same caption. The shapes grammar repeats
    captions within a batch; counting such pairs as negatives would punish the right answer."""
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions])
    return ids[:, None] == ids[None, :]


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE per example (B,): the mean of the image->text and text->image
    cross-entropies of the (B, B) cosine logits times logit_scale. `positives` (B, B) bools marks
    every matching pair (default: the diagonal); the target spreads evenly over them."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"image and text embeddings must both be (B, D), got {image_emb.shape} and {text_emb.shape}")
    batch = image_emb.shape[0]
    if positives is None:
        positives = torch.eye(batch, dtype=torch.bool)
    positives = positives.to(image_emb.device)
    if positives.shape != (batch, batch) or not positives.diagonal().all():
        raise ValueError(f"positives must be a ({batch}, {batch}) bool matrix with a True diagonal")
    logits = logit_scale * image_emb.float() @ text_emb.float().T  # (images, texts)
    target = positives.float() / positives.float().sum(1, keepdim=True)
    image_to_text = -(target * logits.log_softmax(1)).sum(1)
    text_to_image = -(target.T * logits.T.log_softmax(1)).sum(1)
    return (image_to_text + text_to_image) / 2


def retrieval_top1(text_emb: Tensor, image_emb: Tensor, positives: Tensor | None = None) -> float:
    """Caption -> image top-1 retrieval: the share of texts i whose most similar image is a match
    of i (image i, or any image `positives[i]` marks as having the same caption)."""
    if text_emb.ndim != 2 or image_emb.ndim != 2 or text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(f"need (N, D) text and (M, D) image embeddings, got {text_emb.shape} and {image_emb.shape}")
    if positives is None:
        if text_emb.shape[0] != image_emb.shape[0]:
            raise ValueError("without positives, text i matches image i: give as many texts as images")
        positives = torch.eye(text_emb.shape[0], dtype=torch.bool)
    best = (text_emb.float() @ image_emb.float().T).argmax(1)
    hits = positives.to(best.device)[torch.arange(len(best), device=best.device), best]
    return float(hits.float().mean())


def load_clip(path, device: str | torch.device = "cpu") -> CLIP:
    """A contrastive encoder exported by the "contrastive" task (a run folder or its model/), in
    eval mode without gradients."""
    from pathlib import Path

    from .base import load_network

    directory = Path(path)
    if not (directory / CLIP_FILE).is_file() and (directory / "model" / CLIP_FILE).is_file():
        directory = directory / "model"
    if not (directory / CLIP_FILE).is_file():
        raise ValueError(f'{path} holds no {CLIP_FILE}; train a contrastive encoder (task = "contrastive") first')
    net = load_network(directory, device=device)
    if not isinstance(net, CLIP):
        raise ValueError(f"{directory} holds a {type(net).__name__}, not a CLIP encoder")
    return net.eval().requires_grad_(False)
