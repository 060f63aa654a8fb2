"""Progressive distillation, one round per run (task = "progressive_distillation"): the
student, initialised from the teacher's weights, learns to take in one DDIM step what the
frozen teacher takes in two (see `difflab.methods.distill`). Rounds are chained by
`difflab.train.rounds`: each round's exported student is the next round's teacher."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difflab.denoiser import build_denoiser
from difflab.methods.distill import distillation_loss, student_grid, teacher_grid
from difflab.pipelines.folder import new_manifest, write_manifest
from difflab.schedules import Schedule
from difflab.train.config import Config
from difflab.train.distributed import Dist
from difflab.train.tasks.teachers import check_teacher_data, load_teacher, teacher_condition, trainable_copy

if TYPE_CHECKING:
    from difflab.train.tasks import DataInfo

STUDENT_PARAMETERIZATIONS = ("v", "x0")  # an eps student cannot step from pure noise in one go


class ProgressiveDistillationTask:
    """One round: teacher takes [distill] teacher_steps steps on the "trailing" grid, the student
    half as many; the exported student samples with DDIM on exactly its grid."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        d = config.distill
        if not d.teacher:
            raise ValueError('task "progressive_distillation" needs [distill] teacher = a model folder, run or name')
        frozen, self.teacher, self.teacher_manifest = load_teacher(d.teacher)
        check_teacher_data(self.teacher_manifest, data.sample_shape, frozen.source)
        prediction = self.teacher_manifest["prediction"]
        if prediction not in STUDENT_PARAMETERIZATIONS:
            raise ValueError(
                f"the teacher {frozen.source} predicts {prediction!r}; progressive distillation needs a v- or "
                "x0-prediction model (an eps student cannot take one step from pure noise): train one with "
                '[diffusion] prediction = "v" first'
            )
        self.config, self.data, self.step = config, data, 0
        self.frozen = {"teacher": frozen}
        self.model = trainable_copy(frozen.module)
        self.schedule = Schedule.from_config(self.teacher_manifest["schedule"])
        self.grid = teacher_grid(self.schedule, d.teacher_steps)
        self.student_steps = student_grid(self.grid).numel()

    def student(self, model: nn.Module):
        m = self.teacher_manifest
        return build_denoiser(model, self.schedule, m["prediction"], m["variance"], tuple(m["sample_shape"]))

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        cond = teacher_condition(self.teacher_manifest, batch)
        losses, logs = distillation_loss(self.student(model), self.teacher, batch["x"], self.grid, cond, generator)
        return losses, {k: v.float().mean() for k, v in logs.items()}

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        from difflab.guidance import as_saved, class_labels
        from difflab.samplers import sample

        device = next(model.parameters()).device
        cond = None
        if self.teacher_manifest.get("conditioning") == "class":
            cond = {"y": class_labels(n, self.teacher_manifest["num_classes"]).to(device)}
        student = as_saved(self.student(model), self.teacher_manifest)
        shape = (n, *self.data.sample_shape)
        return sample(student, shape, "ddim", self.student_steps, spacing="trailing", generator=generator,
                      progress=False, cond=cond, device=device)  # fmt: skip

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def export(self, model: nn.Module, directory: Path) -> None:
        """The student as a model folder that samples with DDIM on its own grid."""
        model.save_pretrained(directory)
        m = self.teacher_manifest
        manifest = new_manifest(**{k: v for k, v in m.items() if k not in ("sample", "distillation")})
        manifest["sample"] = {**m["sample"], "sampler": "ddim", "steps": self.student_steps, "spacing": "trailing",
                              "eta": 0.0}  # fmt: skip
        manifest["distillation"] = {
            "method": "progressive",
            "teacher": self.frozen["teacher"].source,
            "teacher_steps": self.grid.numel(),
            "student_timesteps": student_grid(self.grid).tolist(),
            "previous": m.get("distillation"),
        }
        write_manifest(directory, manifest)
