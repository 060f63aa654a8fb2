"""The contrastive encoder (CLIP, Radford et al. 2021) trained by the same loop: symmetric
InfoNCE between a batch's images and captions (digit labels become "a handwritten seven").
The export is the network plus clip.json; unCLIP's prior and decoder load it frozen
(`difflab.nets.clip.load_clip`)."""

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

from difflab.nets.clip import CLIP_FILE, CLIP_FORMAT, load_clip

__all__ = ["CLIP_FILE", "CLIP_FORMAT", "ContrastiveTask", "load_clip"]


class ContrastiveTask:
    """A `CLIP` network on captioned (or digit-labelled) images; logs the in-batch caption ->
    image top-1 accuracy and the temperature. No sample grid, no extra state."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.nets import CLIP, build_network

        self.config, self.data, self.step = config, data, 0
        self.model = build_network(config.model)
        if not isinstance(self.model, CLIP):
            raise ValueError(f'task "contrastive" needs [model] class = "CLIP", got {type(self.model).__name__}')
        if data.captions is None and data.num_classes is None:
            raise ValueError('task "contrastive" needs captioned data (e.g. name = "shapes") or digit labels')

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        from difflab.methods.unclip import batch_captions
        from difflab.nets.clip import clip_loss, retrieval_top1, same_caption

        captions = batch_captions(batch)
        image_emb, text_emb, scale = model(batch["x"], captions)
        positives = same_caption(captions)
        losses = clip_loss(image_emb, text_emb, scale, positives)
        top1 = retrieval_top1(text_emb.detach(), image_emb.detach(), positives)
        return losses, {"top1": torch.tensor(top1), "temperature": 1.0 / scale.detach()}

    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> None:
        return None

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def export(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        meta = {"format": CLIP_FORMAT, "version": 1, "embed_dim": model.config.embed_dim,
                "data": dict(self.config.data)}  # fmt: skip
        (Path(directory) / CLIP_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
