"""Denoising networks trained with `DiffusionLoss`: unconditional, class-conditional and
text-to-image; the export is a model folder (weights + the diffusion.json manifest) that
`difflab.Pipeline.from_pretrained` loads.

Both tasks drop the condition themselves (`conditions`), at the rate their network's config
names, so the network stays a pure function of (x, t, cond) and learns p(x) for CFG too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difflab.denoiser import LATENT_CLIP_LIMIT, Denoiser, NetworkDenoiser
from difflab.losses import DiffusionLoss
from difflab.pipelines.folder import AUTOENCODER, DENOISER, new_manifest, write_manifest
from difflab.schedules import Schedule
from difflab.train.config import Config
from difflab.train.distributed import Dist
from difflab.train.tasks.conditions import NULL_CAPTION, drop_captions, drop_labels

if TYPE_CHECKING:
    from difflab.train.tasks import DataInfo

LATENT_DIR = "autoencoder"  # inside a latent pipeline folder


def resolved_thresholding(kind: str, sample_shape: tuple[int, ...]) -> str:
    """sample.thresholding resolved: "auto" is static clipping for images (latents too, at a
    bound for unit variance: thresholding_limit), none for vectors."""
    if kind == "auto":
        return "static" if len(sample_shape) == 3 else "none"
    return kind


def recipe_schedule(d, data: DataInfo | None = None) -> Schedule:
    """The schedule a recipe's [diffusion] describes. A VE ladder with sigma_max = 0 takes it
    from the data (`DataInfo.largest_distance`); without data (checks before training) a
    stand-in sigma_max gives a ladder of the same length."""
    if d.schedule != "ve":
        return Schedule.make(d.schedule, d.T, zero_terminal_snr=d.zero_terminal_snr)
    sigma_max = d.sigma_max or (data.largest_distance() if data is not None else 2 * d.sigma_min)
    return Schedule.ve(d.sigma_min, sigma_max, d.T, d.ve_spacing)


def recipe_objective(d, schedule: Schedule, dist: Dist | None = None) -> DiffusionLoss:
    """The `DiffusionLoss` a recipe's [diffusion] describes, its timesteps shared across processes."""
    objective = DiffusionLoss(
        schedule, d.loss_type, weighting=d.weighting, snr_gamma=d.snr_gamma,
        lambda_vlb=d.lambda_vlb, importance=d.importance, time=d.time,
    )  # fmt: skip
    if dist is not None and dist.active:
        objective.timesteps = SharedTimesteps(objective.timesteps, dist)
    return objective


class SharedTimesteps:
    """Every process records every process's (t, loss) in rank order, so the importance
    sampler's history (and the checkpoint rank 0 writes) is the same on all ranks."""

    def __init__(self, inner, dist: Dist):
        self.inner, self.dist = inner, dist

    def sample(self, batch: int, device, generator=None):
        return self.inner.sample(batch, device, generator)

    def update(self, t: Tensor, losses: Tensor) -> None:
        self.inner.update(self.dist.gather(t), self.dist.gather(losses.float()))

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class DiffusionTask:
    """A denoising network trained with `DiffusionLoss`; class labels become cond {"y"} when
    the network is class-conditional (its config has `num_classes`). Labels are replaced by
    the null label at the config's `class_dropout_prob` (0 when it has none), which is what
    classifier-free guidance needs; `sample.guidance` is the CFG weight of the sample grids."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.nets import build_network

        d = config.diffusion
        self.config, self.data, self.step = config, data, 0
        self.model = build_network(config.model)
        net_config = getattr(self.model, "config", None)
        self.num_classes = getattr(net_config, "num_classes", None)
        self.class_dropout_prob = getattr(net_config, "class_dropout_prob", 0.0)
        if self.num_classes is not None and data.num_classes is None:
            raise ValueError(
                f"the network is class-conditional (num_classes = {self.num_classes}) but the data has no labels"
            )
        if self.num_classes is not None and data.num_classes > self.num_classes:
            raise ValueError(
                f"the data has {data.num_classes} classes but the network's num_classes is {self.num_classes}"
            )
        self.schedule = recipe_schedule(d, data)
        self.objective = recipe_objective(d, self.schedule, dist)

    def denoiser(self, model: nn.Module) -> NetworkDenoiser:
        d = self.config.diffusion
        return NetworkDenoiser(model, self.schedule, d.prediction, d.variance, self.data.sample_shape)

    def condition(self, batch: dict, generator: torch.Generator) -> dict | None:
        """The cond of one training batch, after condition dropout (the label null = num_classes)."""
        if self.num_classes is None:
            return None
        return {"y": drop_labels(batch["y"], self.class_dropout_prob, self.num_classes, generator)}

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        cond = self.condition(batch, generator)
        losses, logs = self.objective(self.denoiser(model), batch["x"], cond, generator)
        return losses, {k: v.float().mean() for k, v in logs.items() if k != "t"}

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        from difflab.samplers import sample

        s = self.config.sample
        device = next(model.parameters()).device
        denoiser, cond = self.grid_condition(self.denoiser(model), n, device)
        x = sample(
            denoiser, (n, *self.data.sample_shape), s.sampler, s.steps, s.eta,
            generator=generator, progress=False, cond=cond, device=device,
        )  # fmt: skip
        return x if self.data.autoencoder is None else self.data.autoencoder.decode_scaled(x)

    def grid_condition(self, denoiser: NetworkDenoiser, n: int, device) -> tuple[Denoiser, dict | None]:
        """The denoiser and cond of the sample grid: classes in turn, with CFG if sample.guidance,
        thresholded as the exported model will be."""
        from difflab.guidance import conditioned

        denoiser, cond = conditioned(denoiser, self.metadata(), n, scale=self.config.sample.guidance)
        return denoiser, None if cond is None else {k: v.to(device) for k, v in cond.items()}

    @property
    def thresholding(self) -> str:
        return resolved_thresholding(self.config.sample.thresholding, self.data.sample_shape)

    def extra_state(self) -> dict:
        return {"timesteps": self.objective.timesteps.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.objective.timesteps.load_state_dict(state["timesteps"])

    def export(self, model: nn.Module, directory: Path) -> None:
        """A model folder: the network (+ the autoencoder of a latent model) and the manifest."""
        if not hasattr(model, "save_pretrained"):
            raise ValueError(f"{type(model).__name__} has no save_pretrained; build networks with difflab.nets")
        model.save_pretrained(directory)
        if self.data.autoencoder is not None:  # the pipeline folder carries its decoder
            self.data.autoencoder.save_pretrained(Path(directory) / LATENT_DIR)
        write_manifest(directory, self.metadata())

    def metadata(self) -> dict:
        """The model's manifest (diffusion.json, see `difflab.pipelines.folder`)."""
        d, s = self.config.diffusion, self.config.sample
        components = {DENOISER: "."} if self.data.autoencoder is None else {DENOISER: ".", AUTOENCODER: LATENT_DIR}
        return new_manifest(
            components=components,
            schedule=self.schedule.to_config(),
            prediction=d.prediction,
            variance=d.variance,
            sample_shape=list(self.data.sample_shape),
            conditioning="class" if self.num_classes is not None else None,
            num_classes=self.num_classes,
            thresholding=self.thresholding,
            thresholding_limit=1.0 if self.data.autoencoder is None else LATENT_CLIP_LIMIT,
            sample={"sampler": s.sampler, "steps": s.steps, "spacing": s.spacing or None, "n": s.n, "eta": s.eta,
                    "guidance": s.guidance},  # fmt: skip
            data=dict(self.config.data),
            latent=self.latent_metadata(),
        )

    def latent_metadata(self) -> dict | None:
        """None for pixel models; for latent ones, the latents' scale factor and the image shape."""
        autoencoder = self.data.autoencoder
        if autoencoder is None:
            return None
        _, h, w = self.data.sample_shape
        f = autoencoder.downsampling_factor
        channels = autoencoder.config.out_channels or autoencoder.config.in_channels
        return {"scale_factor": float(autoencoder.scale_factor), "image_shape": [channels, h * f, w * f]}


class TextDiffusionTask(DiffusionTask):
    """Text-to-image: a `TextConditionalUNet` (U-Net + text encoder, one module, so both are
    trained, averaged, checkpointed and exported together) on captioned data. Captions are
    replaced by "" at the model's `caption_dropout_prob`, so it also learns the unconditional
    half of CFG. The export is a plain pipeline folder: `load_pipeline` rebuilds it, and
    `difflab.guidance.conditioned(denoiser, meta, n, prompt=..., scale=w)` samples from it."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        super().__init__(config, data, dist)
        from difflab.nets.text import TextConditionalUNet

        if not isinstance(self.model, TextConditionalUNet):
            raise ValueError(
                f'task "text_diffusion" needs [model] class = "TextConditionalUNet", got {type(self.model).__name__}'
            )
        if data.captions is None:
            raise ValueError('task "text_diffusion" needs data whose items have a "caption" (e.g. name = "shapes")')
        self.caption_dropout_prob = self.model.config.caption_dropout_prob

    def condition(self, batch: dict, generator: torch.Generator) -> dict:
        captions = batch.get("caption")
        if captions is None or isinstance(captions, str):
            raise ValueError(f'a text_diffusion batch needs "caption": a list of strings, got {captions!r}')
        return {"caption": drop_captions(captions, self.caption_dropout_prob, generator)}

    def grid_condition(self, denoiser: NetworkDenoiser, n: int, device) -> tuple[Denoiser, dict | None]:
        """The first captions of the data in turn, with CFG weight sample.guidance."""
        from difflab.guidance import conditioned

        prompts = [self.data.captions[i % len(self.data.captions)] for i in range(n)]
        return conditioned(denoiser, self.metadata(), n, scale=self.config.sample.guidance, prompt=prompts)

    def metadata(self) -> dict:
        return {**super().metadata(), "conditioning": "text", "null_caption": NULL_CAPTION}
