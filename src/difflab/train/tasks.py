"""What is being trained, as seen by the training loop: a module, a loss, pictures, export.

The loop knows only the `Task` protocol, so classifiers, autoencoders or distillation can
be trained by the same loop by adding a class here and a name in `TASKS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from difflab.data.shape_scenes import ATTRIBUTES
from difflab.denoiser import LATENT_CLIP_LIMIT, Denoiser, NetworkDenoiser
from difflab.losses import DiffusionLoss
from difflab.nets.base import ConfigModule, NetConfig, check_image, check_int, check_int_tuple
from difflab.schedules import Schedule
from difflab.train.config import Config
from difflab.train.distributed import Dist

DIFFUSION_FILE = "diffusion.json"
DIFFUSION_FORMAT = "difflab-diffusion"
LATENT_DIR = "autoencoder"  # inside a latent pipeline folder


@dataclass(frozen=True)
class DataInfo:
    """What a task may know about the data before training: one example's shape, the number of
    classes (None for unlabelled data) and, for captioned data, the first captions (prompts
    for the sample grids of text-conditional models)."""

    sample_shape: tuple[int, ...]
    num_classes: int | None = None
    captions: tuple[str, ...] | None = None
    examples: Tensor | None = None  # the first few x, for pictures of reconstructions
    autoencoder: nn.Module | None = None  # latent data: the autoencoder whose scaled latents x are

    @classmethod
    def of(cls, dataset, num_captions: int = 64, num_examples: int = 8, autoencoder=None) -> DataInfo:
        first = dataset[0]
        captions = None
        if "caption" in first:
            captions = tuple(dataset[i]["caption"] for i in range(min(len(dataset), num_captions)))
        examples = torch.stack([dataset[i]["x"] for i in range(min(len(dataset), num_examples))])
        num_classes = getattr(getattr(dataset, "dataset", dataset), "num_classes", None)
        return cls(tuple(first["x"].shape), num_classes, captions, examples, autoencoder)


class Task(Protocol):
    model: nn.Module  # the trainable module; the loop optimises its parameters
    step: int  # optimizer updates done so far; the loop sets it before each step

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-example loss (B,) and scalar logs for one micro-batch. `model` is `self.model`
        or a wrapper of it (DistributedDataParallel): call it, not `self.model`."""
        ...

    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor | None:
        """n pictures in [-1, 1] for the sample grid (None if the task has none)."""
        ...

    def extra_state(self) -> dict:
        """State besides the weights that a resumed run needs (tensors and JSON values)."""
        ...

    def load_extra_state(self, state: dict) -> None: ...

    def export(self, model: nn.Module, directory: Path) -> None:
        """Write the trained `model` (the EMA copy when there is one) for inference."""
        ...


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
    the network is class-conditional (its config has `num_classes`). The U-Net's
    `class_dropout_prob` replaces labels by the null label during training, which is what
    classifier-free guidance needs; `sample.guidance` is the CFG weight of the sample grids."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.nets import build_network

        d = config.diffusion
        self.config, self.data = config, data
        self.model = build_network(config.model)
        self.num_classes = getattr(getattr(self.model, "config", None), "num_classes", None)
        if self.num_classes is not None and data.num_classes is None:
            raise ValueError(
                f"the network is class-conditional (num_classes = {self.num_classes}) but the data has no labels"
            )
        if self.num_classes is not None and data.num_classes > self.num_classes:
            raise ValueError(
                f"the data has {data.num_classes} classes but the network's num_classes is {self.num_classes}"
            )
        self.schedule = Schedule.make(d.schedule, d.T, zero_terminal_snr=d.zero_terminal_snr)
        self.objective = DiffusionLoss(
            self.schedule, d.loss_type, weighting=d.weighting, snr_gamma=d.snr_gamma,
            lambda_vlb=d.lambda_vlb, importance=d.importance,
        )  # fmt: skip
        if dist is not None and dist.active:
            self.objective.timesteps = SharedTimesteps(self.objective.timesteps, dist)

    def denoiser(self, model: nn.Module) -> NetworkDenoiser:
        d = self.config.diffusion
        return NetworkDenoiser(model, self.schedule, d.prediction, d.variance, self.data.sample_shape)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        cond = {"y": batch["y"]} if self.num_classes is not None else None
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
        """sample.thresholding resolved: "auto" is static clipping for images, none for vectors."""
        kind = self.config.sample.thresholding
        if kind == "auto":  # latents are clipped too, at a bound for unit variance (thresholding_limit)
            return "static" if len(self.data.sample_shape) == 3 else "none"
        return kind

    def extra_state(self) -> dict:
        return {"timesteps": self.objective.timesteps.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.objective.timesteps.load_state_dict(state["timesteps"])

    def export(self, model: nn.Module, directory: Path) -> None:
        """`save_pretrained` plus diffusion.json: what `load_pipeline` needs to rebuild the denoiser."""
        if not hasattr(model, "save_pretrained"):
            raise ValueError(f"{type(model).__name__} has no save_pretrained; build networks with difflab.nets")
        model.save_pretrained(directory)
        if self.data.autoencoder is not None:  # the pipeline folder carries its decoder
            self.data.autoencoder.save_pretrained(Path(directory) / LATENT_DIR)
        meta = self.metadata()
        (Path(directory) / DIFFUSION_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    def metadata(self) -> dict:
        """The contents of diffusion.json."""
        d, s = self.config.diffusion, self.config.sample
        return {
            "format": DIFFUSION_FORMAT,
            "version": 1,
            "schedule": d.schedule,
            "T": d.T,
            "zero_terminal_snr": d.zero_terminal_snr,
            "prediction": d.prediction,
            "variance": d.variance,
            "sample_shape": list(self.data.sample_shape),
            "num_classes": self.num_classes,
            "data": dict(self.config.data),
            "thresholding": self.thresholding,
            "thresholding_limit": 1.0 if self.data.autoencoder is None else LATENT_CLIP_LIMIT,
            "sample": {"sampler": s.sampler, "steps": s.steps, "n": s.n, "eta": s.eta, "guidance": s.guidance},
            "latent": self.latent_metadata(),
        }

    def latent_metadata(self) -> dict | None:
        """None for pixel models; for latent ones, where the autoencoder is and what it decodes to."""
        autoencoder = self.data.autoencoder
        if autoencoder is None:
            return None
        _, h, w = self.data.sample_shape
        f = autoencoder.downsampling_factor
        channels = autoencoder.config.out_channels or autoencoder.config.in_channels
        return {
            "autoencoder": LATENT_DIR,
            "scale_factor": float(autoencoder.scale_factor),
            "image_shape": [channels, h * f, w * f],
        }


class TextDiffusionTask(DiffusionTask):
    """Text-to-image: a `TextConditionalUNet` (U-Net + text encoder, one module, so both are
    trained, averaged, checkpointed and exported together) on captioned data. The model drops
    captions to "" at its `caption_dropout_prob`, so it also learns the unconditional half of
    CFG. The export is a plain pipeline folder: `load_pipeline` rebuilds it, and
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

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        captions = batch.get("caption")
        if captions is None or isinstance(captions, str):
            raise ValueError('a text_diffusion batch needs "caption": a list of strings')
        losses, logs = self.objective(self.denoiser(model), batch["x"], {"caption": list(captions)}, generator)
        return losses, {k: v.float().mean() for k, v in logs.items() if k != "t"}

    def grid_condition(self, denoiser: NetworkDenoiser, n: int, device) -> tuple[Denoiser, dict | None]:
        """The first captions of the data in turn, with CFG weight sample.guidance."""
        from difflab.guidance import conditioned

        prompts = [self.data.captions[i % len(self.data.captions)] for i in range(n)]
        return conditioned(denoiser, self.metadata(), n, scale=self.config.sample.guidance, prompt=prompts)

    def metadata(self) -> dict:
        return {**super().metadata(), "conditioning": "text", "null_caption": ""}


# ---------------------------------------------------------------- autoencoders
AUTOENCODER_FILE = "autoencoder.json"
AUTOENCODER_FORMAT = "difflab-autoencoder"


class AutoencoderTask:
    """Perceptual compression, latent diffusion's first stage: the `Autoencoder` of [model]
    and, if [model.discriminator] is given, a `PatchDiscriminator`, trained together as one
    `AutoencoderGAN` (one optimizer: their gradients do not mix; keep train.grad_clip = 0 so
    the clipping does not couple them). [model.loss] holds `AutoencoderLossConfig`'s weights;
    the GAN terms start at loss.disc_start, counted in optimizer steps; loss.perceptual_weight
    > 0 adds LPIPS (backbone [model] lpips_net, default "vgg") from weights already on the
    machine. The sample grid shows the first training images above their reconstructions.
    The export is the autoencoder alone plus autoencoder.json; a diffusion recipe with
    `[latent] autoencoder = RUN` trains on its latents."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.methods.latent import AutoencoderGAN, load_lpips
        from difflab.nets import Autoencoder, build_network

        model = dict(config.model)
        discriminator, loss = model.pop("discriminator", None), model.pop("loss", {})
        loss_net = model.pop("lpips_net", "vgg")
        autoencoder = build_network(model)
        if not isinstance(autoencoder, Autoencoder):
            kind = type(autoencoder).__name__
            raise ValueError(f'task "autoencoder" needs [model] class = "Autoencoder", got {kind}')
        channels = autoencoder.config.in_channels
        if len(data.sample_shape) != 3 or data.sample_shape[0] != channels:
            raise ValueError(f"the autoencoder takes {channels}-channel images; the data's examples have shape "
                             f"{data.sample_shape}")  # fmt: skip
        autoencoder.latent_shape(*data.sample_shape[1:])  # the image size must be a multiple of f
        critic = None if discriminator is None else _build_discriminator(discriminator, channels)
        loss = _loss_config(loss)
        perceptual = load_lpips(loss_net) if loss.perceptual_weight > 0 else None
        self.config, self.data, self.step = config, data, 0
        self.model = AutoencoderGAN(autoencoder, critic, loss, perceptual)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        return model(batch["x"], self.step, generator)

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        device = next(model.parameters()).device
        x = self.data.examples[: max(1, n // 2)].to(device)
        return torch.cat([x, model.autoencoder(x, sample_posterior=False).reconstruction.clamp(-1, 1)])

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def metadata(self, autoencoder: nn.Module) -> dict:
        return {
            "format": AUTOENCODER_FORMAT,
            "version": 1,
            "image_shape": list(self.data.sample_shape),
            "latent_shape": list(autoencoder.latent_shape(*self.data.sample_shape[1:])),
            "downsampling_factor": autoencoder.downsampling_factor,
            "regularization": autoencoder.config.regularization,
            "data": dict(self.config.data),
        }

    def export(self, model: nn.Module, directory: Path) -> None:
        model.autoencoder.save_pretrained(directory)
        meta = json.dumps(self.metadata(model.autoencoder), indent=2) + "\n"
        (Path(directory) / AUTOENCODER_FILE).write_text(meta, encoding="utf-8")


def _build_discriminator(config: dict, in_channels: int) -> nn.Module:
    from difflab.nets import PatchDiscriminator

    if not isinstance(config, dict):
        raise ValueError(f"[model.discriminator] must be a table of PatchDiscriminator settings, got {config!r}")
    config = {"in_channels": in_channels, **config}
    kind = config.pop("class", "PatchDiscriminator")
    if kind != "PatchDiscriminator":
        raise ValueError(f'[model.discriminator] class must be "PatchDiscriminator", got {kind!r}')
    return PatchDiscriminator(config)


def _loss_config(values: dict):
    from dataclasses import fields

    from difflab.methods.latent import AutoencoderLossConfig

    allowed = [f.name for f in fields(AutoencoderLossConfig)]
    if not isinstance(values, dict) or set(values) - set(allowed):
        unknown = sorted(set(values) - set(allowed)) if isinstance(values, dict) else values
        raise ValueError(f"[model.loss] has unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return AutoencoderLossConfig(**values)


# ---------------------------------------------------------------- classifiers
CLASSIFIER_FILE = "classifier.json"
CLASSIFIER_FORMAT = "difflab-classifier"


class ClassifierTask:
    """Shared by the classifier tasks: no sample grid, no extra state, export = save_pretrained
    plus classifier.json (what the classifier expects), read back by `load_classifier`."""

    kind = "classifier"

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.nets import build_network

        self.config, self.data = config, data
        self.model = build_network(config.model)

    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> None:
        return None

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def metadata(self) -> dict:
        return {
            "format": CLASSIFIER_FORMAT,
            "version": 1,
            "kind": self.kind,
            "sample_shape": list(self.data.sample_shape),
            "data": dict(self.config.data),
        }

    def export(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        (Path(directory) / CLASSIFIER_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n", encoding="utf-8")


class NoisyClassifierTask(ClassifierTask):
    """p(y | x_t, t) for classifier guidance: cross-entropy on x_t = q_sample(x0, t, eps) with t
    uniform over the chain of [diffusion], whose schedule and T must be those of the diffusion
    model it will guide (the classifier sees the same t indices and noise levels)."""

    kind = "noisy"

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        super().__init__(config, data, dist)
        from difflab.nets import NoisyClassifier

        if not isinstance(self.model, NoisyClassifier):
            raise ValueError(
                f'task "noisy_classifier" needs [model] class = "NoisyClassifier", got {type(self.model).__name__}'
            )
        k = self.model.config.num_classes
        if data.num_classes is None or data.num_classes > k:
            raise ValueError(f"the data has {data.num_classes} classes; the classifier's num_classes is {k}")
        d = config.diffusion
        self.schedule = Schedule.make(d.schedule, d.T, zero_terminal_snr=d.zero_terminal_snr)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        from difflab.process import check_data, q_sample

        x0, y = check_data(batch["x"]), batch["y"].long()
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), generator=generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        logits = model(q_sample(self.schedule, x0, t, eps), t.float())
        losses = nn.functional.cross_entropy(logits.float(), y, reduction="none")
        return losses, {"accuracy": (logits.argmax(1) == y).float().mean()}

    def metadata(self) -> dict:
        d = self.config.diffusion
        return {
            **super().metadata(),
            "schedule": d.schedule,
            "T": d.T,
            "zero_terminal_snr": d.zero_terminal_snr,
            "num_classes": self.model.config.num_classes,
        }


class AttributeClassifierTask(ClassifierTask):
    """The judge of text-to-image samples: an `AttributeClassifier` (plain CNN, one head per
    attribute) trained on the shapes generator's ground-truth labels of single-object scenes."""

    kind = "attributes"

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        super().__init__(config, data, dist)
        if not isinstance(self.model, AttributeClassifier):
            raise ValueError(
                f'task "attribute_classifier" needs [model] class = "AttributeClassifier", '
                f"got {type(self.model).__name__}"
            )

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch.get("labels")
        if not isinstance(labels, dict):
            raise ValueError('an attribute_classifier batch needs "labels": a dict of attribute tensors (shapes data)')
        x = batch["x"]
        logits = model(x)
        losses, logs = 0.0, {}
        all_right = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for name, out in logits.items():
            target = first_object(labels, name).to(x.device)
            losses = losses + nn.functional.cross_entropy(out.float(), target, reduction="none")
            right = out.argmax(1) == target
            logs[f"acc_{name}"] = right.float().mean()
            all_right &= right
        logs["acc_all"] = all_right.float().mean()
        return losses, logs

    def metadata(self) -> dict:
        return {**super().metadata(), "attributes": list(self.model.config.attributes)}


def first_object(labels: dict, name: str) -> Tensor:
    """(B,) labels of attribute `name` of single-object scenes ((B,) or (B, 1) tensors)."""
    if name not in labels:
        raise ValueError(f"the batch labels have no attribute {name!r}; they have {sorted(labels)}")
    target = labels[name]
    if target.ndim == 2:
        if target.shape[1] != 1:
            raise ValueError(
                f"attribute labels hold {target.shape[1]} objects per image; the attribute classifier needs "
                "single-object scenes (data.two_objects = false)"
            )
        target = target[:, 0]
    return target.long()


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A classifier exported by a classifier task (eval mode) and its classifier.json."""
    from difflab.nets import load_network

    directory = Path(path)
    if not (directory / CLASSIFIER_FILE).is_file() and (directory / "model" / CLASSIFIER_FILE).is_file():
        directory = directory / "model"  # a run folder
    meta_path = directory / CLASSIFIER_FILE
    if not meta_path.is_file():
        raise ValueError(f"{path} holds no {CLASSIFIER_FILE}; export a classifier task first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}, not {CLASSIFIER_FORMAT!r}")
    return load_network(directory, device=device), meta


# ---------------------------------------------------------------- the attribute classifier
@dataclass(frozen=True)
class AttributeClassifierConfig(NetConfig):
    """channels: one conv stage (two 3x3 convs + ReLU, 2x2 max-pool) per entry; the last map is
    average-pooled to 4x4 and flattened, so where things are survives to the heads."""

    image_size: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 64)
    feature_dim: int = 128
    attributes: tuple[str, ...] = ("shape", "colour", "size", "position")

    def validate(self) -> None:
        check_int("image_size", self.image_size, 4)
        check_int("in_channels", self.in_channels, 1)
        check_int("feature_dim", self.feature_dim, 1)
        check_int_tuple("channels", self.channels, 1, allow_empty=False)
        if self.image_size < 4 * 2 ** len(self.channels):
            raise ValueError(f"image_size {self.image_size} is too small for {len(self.channels)} stages (need >= 4 "
                             f"pixels after {len(self.channels)} 2x poolings)")  # fmt: skip
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if not self.attributes or unknown or len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes must be distinct names from {list(ATTRIBUTES)}, got {list(self.attributes)}")


class AttributeClassifier(ConfigModule):
    """``forward(x) -> {attribute: logits}``; ``features(x)`` is the penultimate layer, the feature
    space of the shapes Frechet distance. (Registered by class name like every network; it lives
    here with its task, so import difflab.train.tasks before `load_network` of one.)"""

    config_class = AttributeClassifierConfig
    config: AttributeClassifierConfig

    def __init__(self, config: AttributeClassifierConfig | dict | None = None, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        layers, c_in = [], cfg.in_channels
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            c_in = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.feature = nn.Linear(c_in * 16, cfg.feature_dim)
        self.heads = nn.ModuleDict({a: nn.Linear(cfg.feature_dim, len(ATTRIBUTES[a])) for a in cfg.attributes})

    def features(self, x: Tensor) -> Tensor:
        check_image(x, self.config.in_channels, "AttributeClassifier")
        size = self.config.image_size
        if tuple(x.shape[2:]) != (size, size):
            raise ValueError(f"AttributeClassifier was built for {size}x{size} images, got {tuple(x.shape[2:])}")
        return nn.functional.relu(self.feature(self.body(x)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}


TASKS = {
    "diffusion": DiffusionTask,
    "text_diffusion": TextDiffusionTask,
    "noisy_classifier": NoisyClassifierTask,
    "attribute_classifier": AttributeClassifierTask,
    "autoencoder": AutoencoderTask,
}


def build_task(config: Config, data: DataInfo, dist: Dist | None = None) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; allowed: {', '.join(TASKS)}")
    return TASKS[config.task](config, data, dist)
