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

from difflab.denoiser import NetworkDenoiser
from difflab.losses import DiffusionLoss
from difflab.schedules import Schedule
from difflab.train.config import Config
from difflab.train.distributed import Dist

DIFFUSION_FILE = "diffusion.json"
DIFFUSION_FORMAT = "difflab-diffusion"


@dataclass(frozen=True)
class DataInfo:
    """What a task may know about the data before training: one example's shape and the
    number of classes (None for unlabelled data)."""

    sample_shape: tuple[int, ...]
    num_classes: int | None = None

    @classmethod
    def of(cls, dataset) -> DataInfo:
        shape = tuple(dataset[0]["x"].shape)
        return cls(shape, getattr(getattr(dataset, "dataset", dataset), "num_classes", None))


class Task(Protocol):
    model: nn.Module  # the trainable module; the loop optimises its parameters

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
    the network is class-conditional (its config has `num_classes`)."""

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
        cond = {"y": torch.arange(n, device=device) % self.num_classes} if self.num_classes is not None else None
        return sample(
            self.denoiser(model), (n, *self.data.sample_shape), s.sampler, s.steps, s.eta,
            generator=generator, progress=False, cond=cond, device=device,
        )  # fmt: skip

    def extra_state(self) -> dict:
        return {"timesteps": self.objective.timesteps.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.objective.timesteps.load_state_dict(state["timesteps"])

    def export(self, model: nn.Module, directory: Path) -> None:
        """`save_pretrained` plus diffusion.json: what `load_pipeline` needs to rebuild the denoiser."""
        if not hasattr(model, "save_pretrained"):
            raise ValueError(f"{type(model).__name__} has no save_pretrained; build networks with difflab.nets")
        model.save_pretrained(directory)
        d, s = self.config.diffusion, self.config.sample
        meta = {
            "format": DIFFUSION_FORMAT,
            "version": 1,
            "schedule": d.schedule,
            "T": d.T,
            "zero_terminal_snr": d.zero_terminal_snr,
            "prediction": d.prediction,
            "variance": d.variance,
            "sample_shape": list(self.data.sample_shape),
            "num_classes": self.num_classes,
            "sample": {"sampler": s.sampler, "steps": s.steps, "n": s.n, "eta": s.eta},
        }
        (Path(directory) / DIFFUSION_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


TASKS = {"diffusion": DiffusionTask}


def build_task(config: Config, data: DataInfo, dist: Dist | None = None) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; allowed: {', '.join(TASKS)}")
    return TASKS[config.task](config, data, dist)
