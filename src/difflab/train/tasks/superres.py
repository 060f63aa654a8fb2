"""Super-resolution stages of a cascade (task = "super_resolution"; Ho et al. 2021, and Imagen's
text-conditional super-resolution stages).

[data] is the high resolution. Each training image x is downsampled to [superres] low_size
(area average), blurred for a share of the examples if `blur_sigma` is set, corrupted by
conditioning augmentation at a level s drawn per example (`difflab.methods.cascade`), resized
back up and concatenated to x_t; s is given to the network too (``cond["aug_level"]``, so the
[model] U-Net needs concat_channels = the image channels and aug_level_embedding = true). The
class label or the caption passes through as the base model's does, dropped at the network's
rate so the stage learns p(x | z) as well for classifier-free guidance; the low-resolution
condition is never dropped. The loss is the plain diffusion loss of [diffusion].

With `text_encoder`, the stage reads captions with the text encoder of a trained text-to-image
model (usually its base), copied and frozen (Imagen's frozen encoder): no gradient, eval mode,
each caption encoded once and cached. The export is a model folder whose manifest has a
"superres" entry (low size, upsampling, augmentation, its schedule and levels, the default
level); `difflab cascade BASE SR --out DIR` joins it to its base.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difflab.data.resize import downsample, gaussian_blur, resize_factor, upsample
from difflab.methods.cascade import AUG_LEVEL, draw_levels, grid_step, noised_condition, superres_condition
from difflab.schedules import Schedule
from difflab.train.config import Config
from difflab.train.distributed import Dist
from difflab.train.tasks.conditions import NULL_CAPTION, drop_captions
from difflab.train.tasks.diffusion import DiffusionTask

if TYPE_CHECKING:
    from difflab.train.tasks import DataInfo


def model_output_shape(manifest: dict) -> tuple[int, ...]:
    """What a model folder's samples are once decoded: (C, H, W)."""
    latent = manifest.get("latent")
    return tuple(latent["image_shape"] if latent is not None else manifest["sample_shape"])


class SuperResolutionTask(DiffusionTask):
    """A super-resolution stage; see the module docstring and `SuperResConfig`."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.nets.text import TextConditionalUNet

        sr = config.superres
        if sr.low_size < 1:
            raise ValueError('task "super_resolution" needs [superres] low_size = the low resolution in pixels')
        if config.latent.autoencoder:
            raise ValueError('task "super_resolution" works on pixels; leave [latent] out')
        if len(data.sample_shape) != 3 or data.sample_shape[1] != data.sample_shape[2]:
            raise ValueError(f'task "super_resolution" needs square images, got examples of shape {data.sample_shape}')
        super().__init__(config, data, dist)
        self.channels, self.size = data.sample_shape[0], data.sample_shape[-1]
        try:
            resize_factor(self.size, sr.low_size)
        except ValueError:
            raise ValueError(
                f"superres.low_size = {sr.low_size} must divide the data's size {self.size} (and be smaller)"
            ) from None
        if sr.low_size == self.size:
            raise ValueError(f"superres.low_size = {sr.low_size} is the data's own size; give a lower resolution")
        self.text = isinstance(self.model, TextConditionalUNet)
        if self.text and data.captions is None:
            raise ValueError("a TextConditionalUNet stage needs data whose items have a caption (e.g. shapes)")
        self.caption_dropout_prob = self.model.config.caption_dropout_prob if self.text else 0.0
        self.check_network()
        self.level_input = bool(getattr(self.unet.config, "aug_level_embedding", False))  # does the net take s?
        self.base_manifest, self.base_source = self.read_base()
        self.aug_schedule, self.grid_T = self.augmentation_schedule()
        self.text_encoder_source = self.copy_text_encoder()

    # ---------------------------------------------------------------- checks before training
    @property
    def unet(self) -> nn.Module:
        return self.model.unet if self.text else self.model

    def check_network(self) -> None:
        cfg = getattr(self.unet, "config", None)
        concat = getattr(cfg, "concat_channels", None)
        if concat != self.channels:
            raise ValueError(
                f"a super-resolution stage concatenates the {self.channels}-channel low-resolution image to x_t: "
                f"its U-Net needs concat_channels = {self.channels}, got {concat}"
            )
        if self.config.superres.augmentation != "none" and not getattr(cfg, "aug_level_embedding", False):
            raise ValueError(
                f'superres.augmentation = "{self.config.superres.augmentation}" gives the level s to the network: '
                "its U-Net needs aug_level_embedding = true"
            )

    def read_base(self) -> tuple[dict | None, str | None]:
        """The manifest of [superres] base, checked against this stage: its samples must be the
        stage's low-resolution images, and a conditional base must be conditioned as the stage is."""
        from difflab.pipelines import read_manifest, resolve

        source = self.config.superres.base
        if not source:
            return None, None
        directory = resolve(source)
        manifest = read_manifest(directory)
        low = self.config.superres.low_size
        if model_output_shape(manifest) != (self.channels, low, low):
            raise ValueError(
                f"the base {directory} draws images of shape {model_output_shape(manifest)}; this stage refines "
                f"({self.channels}, {low}, {low}) (superres.low_size and the data's channels)"
            )
        mine, theirs = self.conditioning, manifest.get("conditioning")
        if (
            mine is not None
            and theirs is not None
            and (mine != theirs or (mine == "class" and manifest.get("num_classes") != self.num_classes))
        ):
            raise ValueError(
                f"the base {directory} is conditioned on {theirs} ({manifest.get('num_classes')} classes) but this "
                f"stage on {mine} ({self.num_classes}); a cascade gives both the same label or prompt"
            )
        return manifest, str(directory)

    def augmentation_schedule(self) -> tuple[Schedule | None, int | None]:
        """(schedule of the augmentation noise, T of the grid of levels for the truncated variant)."""
        sr = self.config.superres
        if sr.augmentation == "none":
            return None, None
        if sr.augmentation == "noise":
            return Schedule.make(sr.aug_schedule, sr.aug_T), None
        if self.base_manifest.get("latent") is not None:
            raise ValueError(f"the base {self.base_source} is a latent model: its chain cannot feed a truncated stage")
        schedule = Schedule.from_config(self.base_manifest["schedule"])
        draw_levels(1, *sr.aug_levels, torch.Generator(), grid_T=schedule.T)  # a clear error if no step is in range
        grid_step(sr.aug_level, schedule.T, "superres.aug_level")
        return schedule, schedule.T

    def copy_text_encoder(self) -> str | None:
        """[superres] text_encoder: that model's trained text encoder, copied into the stage (frozen)."""
        from difflab.nets.text import TextConditionalUNet
        from difflab.pipelines import load_pipeline, resolve

        source = self.config.superres.text_encoder
        if not source:
            return None
        if not self.text or not self.model.config.freeze_text_encoder:
            raise ValueError(
                "superres.text_encoder copies a trained encoder into a frozen one: [model] must be a "
                "TextConditionalUNet with freeze_text_encoder = true"
            )
        directory = resolve(source)
        raw, _ = load_pipeline(directory)
        if not isinstance(raw.net, TextConditionalUNet):
            raise ValueError(f"superres.text_encoder: {directory} is not a text-conditional model (no text encoder)")
        theirs, mine = raw.net.text_encoder, self.model.text_encoder
        if type(theirs) is not type(mine) or theirs.config != mine.config:
            raise ValueError(
                f"[model.text_encoder] must have the settings of {directory}'s encoder to take its weights: "
                f"{type(theirs).__name__} {theirs.config.to_dict()}"
            )
        mine.load_state_dict(theirs.state_dict())
        return str(directory)

    @property
    def conditioning(self) -> str | None:
        if self.text:
            return "text"
        return "class" if self.num_classes is not None else None

    # ---------------------------------------------------------------- the condition
    def base_condition(self, batch: dict, generator: torch.Generator) -> dict:
        """The label or caption of each example, a share of them dropped (the null condition)."""
        if not self.text:
            return super().condition(batch, generator) or {}
        captions = batch.get("caption")
        if captions is None or isinstance(captions, str):
            raise ValueError(f'a text-conditional stage needs batch "caption": a list of strings, got {captions!r}')
        return {"caption": drop_captions(captions, self.caption_dropout_prob, generator)}

    def low_resolution(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(z_s, s): each image's augmented low-resolution condition and its level."""
        sr = self.config.superres
        n = x.shape[0]
        low = downsample(x, sr.low_size)
        if sr.augmentation == "none":
            levels = torch.zeros(n)
        else:
            levels = draw_levels(n, *sr.aug_levels, generator, grid_T=self.grid_T)
        if sr.blur_sigma:
            blurred = torch.rand(n, generator=generator, device=generator.device) < sr.blur_prob
            lo, hi = sr.blur_sigma
            sigma = lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)
            low = gaussian_blur(low, torch.where(blurred, sigma, torch.zeros_like(sigma)))
        if self.aug_schedule is not None:
            noise = torch.randn(low.shape, generator=generator, device=generator.device, dtype=low.dtype)
            low = noised_condition(low, levels, self.aug_schedule, noise.to(low.device))
        return low, levels.to(x.device)

    def condition(self, batch: dict, generator: torch.Generator) -> dict:
        cond = self.base_condition(batch, generator)
        z, levels = self.low_resolution(batch["x"], generator)
        return {**cond, **self.stage_condition(z, levels)}

    def stage_condition(self, z: Tensor, levels) -> dict:
        """The upsampled condition and, if the network takes it, the level."""
        cond = superres_condition(z, levels, self.size, self.config.superres.upsample)
        if not self.level_input:  # an unaugmented stage without the level embedding
            del cond[AUG_LEVEL]
        return cond

    # ---------------------------------------------------------------- sample grids and export
    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        """Pairs (condition, resized up | sample) for the first training images, at the level
        [superres] aug_level, with [sample] guidance: about n pictures (16 -> 8 pairs)."""
        from difflab.guidance import conditioned
        from difflab.samplers import sample

        s, sr = self.config.sample, self.config.superres
        device = next(model.parameters()).device
        side = max(2, 2 * round(math.sqrt(n) / 2))
        pairs = side * side // 2
        dataset = self.data.dataset
        items = [dataset[i % len(dataset)] for i in range(pairs)]
        low = downsample(torch.stack([it["x"] for it in items]), sr.low_size)
        level = 0.0 if sr.augmentation == "none" else sr.aug_level
        if self.aug_schedule is not None:
            noise = torch.randn(low.shape, generator=generator, device=generator.device, dtype=low.dtype)
            low = noised_condition(low, level, self.aug_schedule, noise.to(low.device))
        options = {}
        if self.text:
            options["prompt"] = [it["caption"] for it in items]
        elif self.num_classes is not None:
            options["label"] = [int(it["y"]) for it in items]
        denoiser, cond = conditioned(self.denoiser(model), self.metadata(), pairs, scale=s.guidance, **options)
        cond = {**(cond or {}), **self.stage_condition(low.to(device), level)}
        x = sample(denoiser, (pairs, *self.data.sample_shape), s.sampler, s.steps, s.eta, s.spacing or None,
                   generator=generator, progress=False, cond=cond, device=device)  # fmt: skip
        shown = upsample(low.to(x.device), self.size, "nearest").clamp(-1, 1)
        return torch.stack([shown, x], dim=1).flatten(0, 1)

    def metadata(self) -> dict:
        """The stage's manifest: a diffusion model's, with its conditioning and the "superres" entry."""
        sr = self.config.superres
        manifest = super().metadata()
        if self.text:
            manifest.update(conditioning="text", null_caption=NULL_CAPTION)
        manifest["superres"] = {
            "low_size": sr.low_size,
            "channels": self.channels,
            "upsample": sr.upsample,
            "augmentation": sr.augmentation,
            "aug_schedule": None if self.aug_schedule is None else self.aug_schedule.to_config(),
            "aug_levels": [0.0, 0.0] if sr.augmentation == "none" else list(sr.aug_levels),
            "aug_level": 0.0 if sr.augmentation == "none" else sr.aug_level,
            "aug_level_input": self.level_input,
            "blur_sigma": list(sr.blur_sigma),
            "blur_prob": sr.blur_prob,
            "base": self.base_source,
            "text_encoder": self.text_encoder_source,
        }
        return manifest
