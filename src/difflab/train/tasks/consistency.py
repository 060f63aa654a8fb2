"""Consistency models (task = "consistency"): distillation from a frozen teacher (CD) or
training from data alone (CT, iCT), see `difflab.methods.consistency`. The online network is
trained; the target network is the task's own EMA of it, updated in `after_step` and kept in
the checkpoint (through `extra_state`), so a resumed run continues exactly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difflab.guidance import GUIDANCE_INPUT
from difflab.methods.consistency import (
    ConsistencyDenoiser,
    ConsistencyLoss,
    ct_ema_decay,
    ct_num_levels,
    ict_num_levels,
    karras_levels,
)
from difflab.pipelines.folder import new_manifest, write_manifest
from difflab.schedules import Schedule
from difflab.train.config import Config
from difflab.train.distributed import Dist
from difflab.train.tasks.conditions import drop_labels
from difflab.train.tasks.diffusion import recipe_schedule, resolved_thresholding
from difflab.train.tasks.teachers import (
    check_teacher_data,
    load_teacher,
    teacher_condition,
    trainable_copy,
    with_guidance_input,
)

if TYPE_CHECKING:
    from difflab.train.tasks import DataInfo

PAPER_BOUNDS = {"ct": (2, 150), "ict": (10, 1280)}  # (s0, s1) of Song et al. 2023 and Song & Dhariwal 2023


class ConsistencyTask:
    """CD with [consistency] teacher, CT/iCT without; see `ConsistencyConfig` for the settings."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.nets import build_network

        c = config.consistency
        self.config, self.data, self.step = config, data, 0
        self.frozen, self.teacher, self.teacher_manifest = {}, None, None
        if c.teacher:
            frozen, self.teacher, self.teacher_manifest = load_teacher(c.teacher, guided=bool(c.guidance))
            check_teacher_data(self.teacher_manifest, data.sample_shape, frozen.source)
            self.frozen = {"teacher": frozen}
            self.schedule = Schedule.from_config(self.teacher_manifest["schedule"])
            student = with_guidance_input if c.guidance else trainable_copy
            self.model = build_network(config.model) if config.model else student(frozen.module)
        else:
            if not config.model:
                raise ValueError('consistency training (no [consistency] teacher) needs a [model] to train')
            d = config.diffusion
            self.schedule = recipe_schedule(d, data)
            self.model = build_network(config.model)
        self.num_classes = getattr(getattr(self.model, "config", None), "num_classes", None)
        self.class_dropout_prob = getattr(getattr(self.model, "config", None), "class_dropout_prob", 0.0)
        self.target = copy.deepcopy(self.model).requires_grad_(False)
        self.s0, self.s1 = (c.s0, c.s1) if c.s0 and c.s1 else PAPER_BOUNDS.get(c.curriculum, (0, 0))

    # ---------------------------------------------------------------- schedules over training
    @property
    def curriculum_steps(self) -> int:
        return self.config.consistency.curriculum_steps or self.config.train.steps

    def num_levels(self, step: int) -> int:
        c, total = self.config.consistency, self.curriculum_steps
        step = min(step, total)  # a run extended past its curriculum keeps the final ladder
        if c.curriculum == "ct":
            return ct_num_levels(step, total, self.s0, self.s1)
        if c.curriculum == "ict":
            return ict_num_levels(step, total, self.s0, self.s1)
        return c.levels

    def target_decay(self, step: int) -> float:
        """mu at `step`: fixed, the CT schedule mu(k), or 0 for iCT (the target is the online net)."""
        c = self.config.consistency
        if c.curriculum == "ct":
            return ct_ema_decay(min(step, self.curriculum_steps), self.curriculum_steps, self.s0, self.s1, c.target_ema)
        return 0.0 if c.curriculum == "ict" else c.target_ema

    def denoiser(self, net: nn.Module) -> ConsistencyDenoiser:
        return ConsistencyDenoiser(
            net, self.schedule, sample_shape=self.data.sample_shape, sigma_data=self.config.consistency.sigma_data
        )

    # ---------------------------------------------------------------- the task contract
    def condition(self, batch: dict, generator: torch.Generator) -> dict | None:
        if self.teacher_manifest is not None:
            cond = teacher_condition(self.teacher_manifest, batch)
            if self.config.consistency.guidance:  # each example its own w, for teacher and student alike
                w_min, w_max = self.config.consistency.guidance
                u = torch.rand(batch["x"].shape[0], generator=generator).to(batch["x"].device)
                cond[GUIDANCE_INPUT] = w_min + (w_max - w_min) * u
            return cond
        if self.num_classes is None:
            return None
        return {"y": drop_labels(batch["y"], self.class_dropout_prob, self.num_classes, generator)}

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config.consistency
        loss = ConsistencyLoss(
            karras_levels(self.schedule, self.num_levels(self.step)), c.distance, c.weighting, c.level_sampling
        )
        cond = self.condition(batch, generator)
        self.target.to(batch["x"].device).train(model.training)  # same dropout as the online pass
        losses, logs = loss(self.denoiser(model), self.denoiser(self.target), batch["x"], cond, generator,
                            teacher=self.teacher)  # fmt: skip
        return losses, {"distance": logs["distance"].float().mean(), "levels": torch.tensor(float(loss.levels.numel()))}

    def after_step(self, model: nn.Module, step: int) -> None:
        """The target network follows the online one: target <- mu target + (1 - mu) online."""
        mu = self.target_decay(step - 1)
        for target, online in zip(self.target.parameters(), model.parameters(), strict=True):
            target.lerp_(online.detach().to(target.device), 1.0 - mu)
        for target, online in zip(self.target.buffers(), model.buffers(), strict=True):
            target.copy_(online)

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        from difflab.guidance import class_labels, thresholded
        from difflab.samplers import sample

        device = next(model.parameters()).device
        self.target.to(device)
        k = self.num_classes or (self.teacher_manifest or {}).get("num_classes")
        cond = {"y": class_labels(n, k).to(device)} if k else None
        if self.config.consistency.guidance:
            cond[GUIDANCE_INPUT] = torch.full((n,), self.sample_guidance, device=device)
        net = self.export_model(model)
        was_training = net.training
        den = thresholded(self.denoiser(net.eval()), self.thresholding)
        try:
            return sample(den, (n, *self.data.sample_shape), "consistency", 1, generator=generator, progress=False,
                          cond=cond, device=device)  # fmt: skip
        finally:
            net.train(was_training)

    def export_model(self, model: nn.Module) -> nn.Module:
        """What is sampled from: the target network when it is an EMA (CD, CT); with iCT's
        target (the online network itself), the loop's EMA copy `model`."""
        return self.target if self.config.consistency.curriculum != "ict" else model

    @property
    def sample_guidance(self) -> float:
        """The w a guidance-distilled model samples with by default: [sample] guidance, kept in
        the distilled range."""
        w_min, w_max = self.config.consistency.guidance
        return min(max(self.config.sample.guidance, w_min), w_max)

    @property
    def thresholding(self) -> str:
        return resolved_thresholding(self.config.sample.thresholding, self.data.sample_shape)

    def extra_state(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])

    def export(self, model: nn.Module, directory: Path) -> None:
        """A model folder of the "consistency" parameterisation: one-step sampling by default."""
        self.export_model(model).save_pretrained(directory)
        c = self.config.consistency
        base = {k: v for k, v in (self.teacher_manifest or {}).items() if k not in ("sample", "components")}
        manifest = new_manifest(**{
            **base,
            "schedule": self.schedule.to_config(),
            "prediction": "consistency",
            "denoiser_options": {"sigma_data": c.sigma_data, "sigma_min": float(self.schedule.sigmas[0])},
            "variance": "fixed_small",
            "sample_shape": list(self.data.sample_shape),
            "thresholding": self.thresholding,
            "data": dict(self.config.data),
            "sample": {"sampler": "consistency", "steps": 1, "spacing": "trailing", "n": self.config.sample.n,
                       "eta": 0.0, "guidance": 0.0},
            "consistency": {"method": "distillation" if self.teacher is not None else "training",
                            "teacher": c.teacher or None,
                            "curriculum": c.curriculum},
        })  # fmt: skip
        if self.num_classes is not None:
            manifest.update(conditioning="class", num_classes=self.num_classes)
        if c.guidance:
            manifest["guidance_input"] = True
            manifest["sample"]["guidance"] = self.sample_guidance
            manifest["consistency"]["guidance_range"] = list(c.guidance)
        write_manifest(directory, new_manifest(**manifest))
