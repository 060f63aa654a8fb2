"""The judge of text-to-image samples on the shapes data: a plain CNN with one head per attribute
(shape, colour, size, position), trained on the generator's ground-truth labels of single-object
scenes (task "attribute_classifier"). Its penultimate layer is the feature space of the shapes
Frechet distance.

Why no time input: it judges finished images, never x_t, so it is not a ``NoisyClassifier``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from difflab.vocabulary import ATTRIBUTES

from .base import ConfigModule, NetConfig, check_image, check_int, check_int_tuple


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
    """``forward(x) -> {attribute: logits}``; ``features(x)`` is the penultimate layer."""

    config_class = AttributeClassifierConfig
    config: AttributeClassifierConfig

    def __init__(self, config: AttributeClassifierConfig | dict | None = None, **overrides: Any):
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
