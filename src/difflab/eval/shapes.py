"""The judge of text-to-image shapes: does a sample show every attribute its prompt asks for
(shape, colour, size, position), and how far are the samples from real scenes?

The judge is an attribute classifier trained by our own recipe (configs/shapes-attributes.toml)
on the generator's ground truth. Prompts are the captions of the first n test scenes, so those
scenes are a matched real reference: the Frechet distance is taken in the classifier's feature
space against them. Images larger than the classifier's input are area-averaged down to it
(64x64 samples are judged at 32x32, as a 64x64 scene averaged to 32x32 is nearly its 32x32
rendering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.data.shape_scenes import ATTRIBUTES, parse_caption
from difflab.eval.frechet import frechet_distance


class ShapesJudge:
    """``judge(x)`` for samples x of ``prompts`` (in order): accuracy (every attribute right),
    per-attribute accuracies and attribute FD against ``real`` (the scenes the prompts describe)."""

    def __init__(self, classifier: nn.Module, prompts: list[str], real: Tensor, batch_size: int = 256):
        self.classifier, self.prompts, self.real, self.batch_size = classifier, list(prompts), real, batch_size
        objects = [parse_caption(p) for p in self.prompts]
        if any(len(o) != 1 for o in objects):
            raise ValueError("the attribute classifier judges single-object prompts only")
        self.targets = {
            a: torch.tensor([ATTRIBUTES[a].index(o[0][a]) for o in objects]) for a in classifier.config.attributes
        }
        self.real_features, _ = self.features_and_logits(real)

    @classmethod
    def for_test_scenes(cls, classifier: nn.Module, n: int, size: int) -> ShapesJudge:
        """Prompts = captions of the first n test scenes rendered at ``size``; they are the reference."""
        from difflab.data import get_dataset

        test = get_dataset("shapes", "test", size=size, n=max(n, 2))
        items = [test[i] for i in range(n)]
        return cls(classifier, [it["caption"] for it in items], torch.stack([it["x"] for it in items]))

    @torch.no_grad()
    def features_and_logits(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        size = self.classifier.config.image_size
        if x.shape[-1] != size:
            if x.shape[-1] % size or x.shape[-2] != x.shape[-1]:
                raise ValueError(f"the judge reads {size}x{size} images (or square multiples), got {tuple(x.shape)}")
            x = F.avg_pool2d(x, x.shape[-1] // size)
        feats = torch.cat([self.classifier.features(chunk) for chunk in x.split(self.batch_size)])
        return feats, {a: head(feats) for a, head in self.classifier.heads.items()}

    def __call__(self, x: Tensor) -> dict:
        """Scores of x, one image per prompt (clamped to [-1, 1] as saved pictures are)."""
        if len(x) != len(self.prompts):
            raise ValueError(f"got {len(x)} images for {len(self.prompts)} prompts")
        feats, logits = self.features_and_logits(x.clamp(-1, 1))
        right = {a: logits[a].argmax(1).cpu() == self.targets[a] for a in self.targets}
        every = torch.stack(list(right.values())).all(0)
        return {
            "accuracy": float(every.double().mean()),
            **{f"acc_{a}": float(r.double().mean()) for a, r in right.items()},
            "attribute_fd": frechet_distance(feats, self.real_features),
        }

    def real_floor(self) -> dict:
        """What real data scores: the judge on the prompts' own scenes (accuracy), and the FD of
        as many real train scenes (same size) against them (the finite-sample floor of the FD)."""
        from difflab.data import get_dataset

        n, size = len(self.prompts), self.real.shape[-1]
        floor = self(self.real)
        train = get_dataset("shapes", "train", size=size, n=max(n, 2))
        train_feats, _ = self.features_and_logits(torch.stack([train[i]["x"] for i in range(n)]))
        floor["attribute_fd"] = frechet_distance(train_feats, self.real_features)
        return floor
