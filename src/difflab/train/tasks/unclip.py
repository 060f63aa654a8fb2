"""unCLIP's two diffusion models, trained on top of a frozen contrastive encoder ([unclip] clip):

- "unclip_prior": a `DiffusionPrior` over standardised CLIP image embeddings given the caption
  (x0-prediction in the recipe); captions are dropped to "" at unclip.caption_dropout for CFG.
  The standardiser's statistics come from the training images' embeddings, once, before
  training (a resumed run recomputes them, then loads the saved ones).
- "unclip_decoder": an `UnCLIPDecoder` over images given the image embedding and caption, each
  dropped per example from its own draw (unclip.image_dropout, unclip.caption_dropout).

Both exports are model folders (diffusion.json) that carry a copy of the encoder in clip/, so
`difflab.pipelines.unclip.assemble_unclip` can check that prior and decoder share one encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difflab.denoiser import NetworkDenoiser
from difflab.pipelines.folder import DENOISER, new_manifest, write_manifest
from difflab.train.config import Config
from difflab.train.distributed import Dist
from difflab.train.tasks.diffusion import DiffusionTask, recipe_objective, recipe_schedule
from difflab.train.tasks.frozen import Frozen

if TYPE_CHECKING:
    from difflab.train.tasks import DataInfo

CLIP_DIR = "clip"


def frozen_clip(config: Config) -> Frozen:
    from difflab.train.tasks.contrastive import load_clip

    if not config.unclip.clip:
        raise ValueError("unclip.clip must name the frozen contrastive encoder (a contrastive run or its model/)")
    return Frozen(load_clip(config.unclip.clip), str(config.unclip.clip))


@torch.no_grad()
def image_embeddings(clip: nn.Module, dataset, limit: int, batch_size: int = 256) -> Tensor:
    """CLIP embeddings of the first `limit` images of `dataset`."""
    n = min(len(dataset), limit)
    out = []
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i]["x"] for i in range(start, min(n, start + batch_size))])
        out.append(clip.encode_image(x))
    return torch.cat(out)


class PriorTask:
    """The diffusion prior P(c_i | y); vectors, so no sample grid."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.nets import DiffusionPrior, build_network

        self.config, self.data, self.step = config, data, 0
        self.model = build_network(config.model)
        if not isinstance(self.model, DiffusionPrior):
            raise ValueError(
                f'task "unclip_prior" needs [model] class = "DiffusionPrior", got {type(self.model).__name__}'
            )
        clip = frozen_clip(config)
        self.frozen = {"clip": clip}
        self.clip = clip.module
        cfg = self.model.config
        if (cfg.embed_dim, cfg.token_dim) != (self.clip.embed_dim, self.clip.token_dim):
            raise ValueError(
                f"the prior's embed_dim/token_dim ({cfg.embed_dim}, {cfg.token_dim}) must be the encoder's "
                f"({self.clip.embed_dim}, {self.clip.token_dim})"
            )
        if data.dataset is None:
            raise ValueError("the prior's standardisation needs the training data")
        self.model.standardizer.fit(image_embeddings(self.clip, data.dataset, config.unclip.stats_examples))
        d = config.diffusion
        self.schedule = recipe_schedule(d, data)
        self.objective = recipe_objective(d, self.schedule, dist)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.model.config.embed_dim,)

    def denoiser(self, model: nn.Module) -> NetworkDenoiser:
        d = self.config.diffusion
        return NetworkDenoiser(model, self.schedule, d.prediction, d.variance, self.sample_shape)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        from difflab.methods.unclip import batch_captions, prior_condition
        from difflab.train.tasks.conditions import drop_captions

        clip = self.clip.to(batch["x"].device)
        with torch.no_grad():
            z = self.model.standardizer(clip.encode_image(batch["x"]))
        captions = drop_captions(batch_captions(batch), self.config.unclip.caption_dropout, generator)
        cond = prior_condition(clip, captions)
        losses, logs = self.objective(self.denoiser(model), z, cond, generator)
        return losses, {k: v.float().mean() for k, v in logs.items() if k != "t"}

    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> None:
        return None

    def extra_state(self) -> dict:
        return {"timesteps": self.objective.timesteps.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.objective.timesteps.load_state_dict(state["timesteps"])

    def metadata(self) -> dict:
        d, s = self.config.diffusion, self.config.sample
        return new_manifest(
            components={DENOISER: ".", CLIP_DIR: CLIP_DIR}, schedule=self.schedule.to_config(),
            prediction=d.prediction, variance=d.variance, sample_shape=list(self.sample_shape),
            sample={"sampler": s.sampler, "steps": s.steps, "spacing": s.spacing or None, "n": s.n, "eta": s.eta,
                    "guidance": s.guidance},
            data=dict(self.config.data),
            unclip={"role": "prior", "draws": self.config.unclip.draws},
        )  # fmt: skip

    def export(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        self.clip.save_pretrained(Path(directory) / CLIP_DIR)
        write_clip_meta(Path(directory) / CLIP_DIR, self.config)
        write_manifest(directory, self.metadata())


def write_clip_meta(directory: Path, config: Config) -> None:
    import json

    from difflab.train.tasks.contrastive import CLIP_FILE, CLIP_FORMAT

    meta = {"format": CLIP_FORMAT, "version": 1, "source": config.unclip.clip}
    (directory / CLIP_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


class DecoderTask(DiffusionTask):
    """The decoder P(x | c_i, y): a DiffusionTask whose condition is the frozen encoder's image
    embedding of the training image (and the caption), dropped for CFG as unCLIP does."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        super().__init__(config, data, dist)
        from difflab.nets import UnCLIPDecoder

        if not isinstance(self.model, UnCLIPDecoder):
            raise ValueError(
                f'task "unclip_decoder" needs [model] class = "UnCLIPDecoder", got {type(self.model).__name__}'
            )
        clip = frozen_clip(config)
        self.frozen = {"clip": clip}
        self.clip = clip.module
        if self.model.config.image_embed_dim != self.clip.embed_dim:
            raise ValueError(
                f"the decoder's image_embed_dim {self.model.config.image_embed_dim} must be the encoder's "
                f"embed_dim {self.clip.embed_dim}"
            )
        self.with_caption = self.model.text_encoder is not None

    def condition(self, batch: dict, generator: torch.Generator) -> dict:
        from difflab.methods.unclip import batch_captions, decoder_dropout

        u = self.config.unclip
        clip = self.clip.to(batch["x"].device)
        with torch.no_grad():
            embed = clip.encode_image(batch["x"])
        captions = batch_captions(batch) if self.with_caption else None
        embed, captions = decoder_dropout(embed, captions, u.image_dropout, u.caption_dropout, generator)
        return {"image_embed": embed} if captions is None else {"image_embed": embed, "caption": captions}

    def grid_condition(self, denoiser: NetworkDenoiser, n: int, device):
        """Variations of the first training images: their embeddings (and captions), CFG weight
        sample.guidance, thresholded as the export will be."""
        from difflab.guidance import as_saved
        from difflab.methods.unclip import guided_decoder

        examples = self.data.examples
        x = torch.stack([examples[i % len(examples)] for i in range(n)]).to(device)
        with torch.no_grad():
            cond = {"image_embed": self.clip.to(device).encode_image(x)}
        if self.with_caption:
            captions = self.data.captions or ("",)
            cond["caption"] = [captions[i % len(examples) % len(captions)] for i in range(n)]
        return as_saved(guided_decoder(denoiser, self.config.sample.guidance), self.metadata()), cond

    def metadata(self) -> dict:
        meta = super().metadata()
        meta["components"] = {**meta["components"], CLIP_DIR: CLIP_DIR}
        return {**meta, "unclip": {"role": "decoder", "captions": self.with_caption}}

    def export(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        self.clip.save_pretrained(Path(directory) / CLIP_DIR)
        write_clip_meta(Path(directory) / CLIP_DIR, self.config)
        write_manifest(directory, self.metadata())
