"""What is being trained, as seen by the training loop: the `Task` contract and the registry
of tasks by recipe name (``task = "..."``).

The loop knows only the `Task` protocol, so diffusion, classifiers, autoencoders or
distillation are trained by the same loop: a new task family is a module in this package, a
class and a name in `TASKS`. One module per family: `diffusion` (denoisers, text-to-image),
`autoencoder`, `classifier`, `control` (ControlNet on a locked base), `superres` (a cascade's
super-resolution stages); `conditions` (condition dropout) and `frozen` (modules a task uses but
never trains) are the shared parts of the contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from difflab.train.config import Config
from difflab.train.distributed import Dist
from difflab.train.tasks.autoencoder import AUTOENCODER_FILE, AUTOENCODER_FORMAT, AutoencoderTask
from difflab.train.tasks.classifier import (
    CLASSIFIER_FILE,
    CLASSIFIER_FORMAT,
    AttributeClassifierTask,
    ClassifierTask,
    NoisyClassifierTask,
    first_object,
    load_classifier,
)
from difflab.train.tasks.conditions import NULL_CAPTION, drop_captions, drop_labels, drop_mask
from difflab.train.tasks.consistency import ConsistencyTask
from difflab.train.tasks.contrastive import ContrastiveTask
from difflab.train.tasks.control import ControlTask
from difflab.train.tasks.diffusion import (
    LATENT_DIR,
    DiffusionTask,
    SharedTimesteps,
    TextDiffusionTask,
)
from difflab.train.tasks.distill import ProgressiveDistillationTask
from difflab.train.tasks.frozen import Frozen, fingerprint
from difflab.train.tasks.superres import SuperResolutionTask
from difflab.train.tasks.unclip import DecoderTask, PriorTask


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
    dataset: Any = field(default=None, repr=False, compare=False)  # for statistics a recipe asks for

    @classmethod
    def of(cls, dataset, num_captions: int = 64, num_examples: int = 8, autoencoder=None) -> DataInfo:
        first = dataset[0]
        captions = None
        if "caption" in first:
            captions = tuple(dataset[i]["caption"] for i in range(min(len(dataset), num_captions)))
        examples = torch.stack([dataset[i]["x"] for i in range(min(len(dataset), num_examples))])
        num_classes = getattr(getattr(dataset, "dataset", dataset), "num_classes", None)
        return cls(tuple(first["x"].shape), num_classes, captions, examples, autoencoder, dataset)

    def largest_distance(self, limit: int = 2000) -> float:
        """The largest L2 distance between two of the first `limit` training examples: NCSN's
        sigma_max (Song & Ermon 2020, technique 1: sigma_1 as large as the largest pairwise
        distance, so the noisiest level can move any example to any other)."""
        if self.dataset is None:
            raise ValueError("the largest pairwise distance needs the training data (DataInfo.of(dataset))")
        n = min(len(self.dataset), limit)
        x = torch.stack([self.dataset[i]["x"] for i in range(n)]).flatten(1).double()
        return float(torch.cdist(x, x).max()) if n > 1 else math.nan


class Task(Protocol):
    """What the training loop (`difflab.train.loop.Trainer`) calls, and when.

    Built once per process by `build_task(config, data, dist)`, before any weights are loaded;
    a resumed run builds it again from the run's config and then restores its state.

    At the start the loop moves `model` to the device, builds the EMA copy of it and an
    optimizer over its parameters. Optional: `frozen` ({name: `Frozen`}, default none), modules
    the task uses but never trains (a teacher, a locked base network, a frozen encoder); the
    loop moves each to the device in eval mode with requires_grad False, keeps it out of the
    optimizer, the EMA and the checkpoint tensors, records its source path and weight
    fingerprint in each checkpoint, and on resume refuses to continue if the module loaded from
    that path has changed. A frozen parameter may not also be a parameter of `model`.

    Each optimizer step: the loop sets `step` (updates done so far), then for every
    micro-batch seeds a `torch.Generator` (and the global RNGs) with (seed, step, shard) and
    calls `loss(...)` inside autocast; it backpropagates, clips, updates the weights, then the
    EMA, and then calls the optional `after_step(model, step)` (default: nothing) under
    `torch.no_grad()` with the unwrapped trainable module and the new step count: the place
    for a target network's EMA (consistency models) or a step-dependent schedule.

    Every `sample_every` steps and at the end: `sample_images(...)` with the sampling model
    (the EMA copy if any) in eval mode and a generator seeded the same way every time.
    At each checkpoint: `extra_state()`; on resume, after the task was rebuilt and the
    weights loaded: `load_extra_state(state)`. Everything that `loss` or `after_step` carry
    from step to step (a target network, a timestep history) must go through these two, so a
    resumed run computes bit for bit what an uninterrupted one computes. At the end, on the
    main process: `export(sampling model, RUN/model)`.

    Random draws come only from the generator given to `loss` (never the global RNGs, which
    only layers such as nn.Dropout use); condition dropout for classifier-free guidance is
    the task's (see `conditions`), so networks never alter their condition themselves.
    """

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

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned."""
        ...

    def export(self, model: nn.Module, directory: Path) -> None:
        """Write the trained `model` (the EMA copy when there is one) for inference."""
        ...

    # Optional members, read by the loop with getattr and a default:
    #   frozen: dict[str, Frozen]                               default {}
    #   def after_step(self, model: nn.Module, step: int) -> None  default: nothing


TASKS: dict[str, type[Task]] = {
    "diffusion": DiffusionTask,
    "text_diffusion": TextDiffusionTask,
    "noisy_classifier": NoisyClassifierTask,
    "attribute_classifier": AttributeClassifierTask,
    "autoencoder": AutoencoderTask,
    "progressive_distillation": ProgressiveDistillationTask,
    "consistency": ConsistencyTask,
    "control": ControlTask,
    "super_resolution": SuperResolutionTask,
    "contrastive": ContrastiveTask,
    "unclip_prior": PriorTask,
    "unclip_decoder": DecoderTask,
}


def build_task(config: Config, data: DataInfo, dist: Dist | None = None) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; allowed: {', '.join(TASKS)}")
    return TASKS[config.task](config, data, dist)


__all__ = [
    "AUTOENCODER_FILE",
    "AUTOENCODER_FORMAT",
    "CLASSIFIER_FILE",
    "CLASSIFIER_FORMAT",
    "LATENT_DIR",
    "NULL_CAPTION",
    "TASKS",
    "AttributeClassifierTask",
    "AutoencoderTask",
    "ClassifierTask",
    "ConsistencyTask",
    "ContrastiveTask",
    "DecoderTask",
    "ControlTask",
    "DataInfo",
    "DiffusionTask",
    "Frozen",
    "NoisyClassifierTask",
    "PriorTask",
    "ProgressiveDistillationTask",
    "SharedTimesteps",
    "SuperResolutionTask",
    "Task",
    "TextDiffusionTask",
    "build_task",
    "drop_captions",
    "drop_labels",
    "drop_mask",
    "first_object",
    "fingerprint",
    "load_classifier",
]
