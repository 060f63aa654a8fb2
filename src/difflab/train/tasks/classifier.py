"""Classifiers trained by the same loop: the noisy classifier p(y | x_t, t) that classifier
guidance follows, and the attribute classifier that judges text-to-image samples. The export
is the network plus classifier.json, read back by `load_classifier`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difflab.train.config import Config
from difflab.train.distributed import Dist
from difflab.train.tasks.diffusion import recipe_schedule

if TYPE_CHECKING:
    from difflab.train.tasks import DataInfo

CLASSIFIER_FILE = "classifier.json"
CLASSIFIER_FORMAT = "difflab-classifier"


class ClassifierTask:
    """Shared by the classifier tasks: no sample grid, no extra state, export = save_pretrained
    plus classifier.json (what the classifier expects), read back by `load_classifier`."""

    kind = "classifier"

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.nets import build_network

        self.config, self.data, self.step = config, data, 0
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
        self.schedule = recipe_schedule(d, data)

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
        from difflab.nets import AttributeClassifier

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
