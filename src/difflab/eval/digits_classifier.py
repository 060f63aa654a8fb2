"""A small CNN that classifies digits; its penultimate layer is the feature space of "digits FD".

Why our own: Inception features mean little on 16x16 grey digits and need a download; a
classifier trained here on the fixed train split is offline, tiny and judges exactly the data we
generate. It is trained with small random shifts so a slightly off-centre generated digit is
still recognised. Weights are stored as config.json + model.safetensors (never pickle), and the
shipped ones (``load_digits_classifier``) are reproduced by the command in
``difflab/pretrained/digits-classifier/recipe.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from difflab.tensorfiles import load_tensors

SIZES = (16, 32)  # input sizes the architecture is meant for (and that ship pretrained)
CONFIG_KEYS = ("size", "channels", "feature_dim", "num_classes")
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained" / "digits-classifier"


class DigitsClassifier(nn.Module):
    """Two conv stages (3x3 conv, ReLU, 3x3 conv, ReLU, 2x2 max-pool), average-pooled to 4x4, then
    a fully connected feature layer (ReLU) and a linear classifier.

    ``features(x)`` is the (B, feature_dim) penultimate activation; ``forward(x)`` gives logits.
    Inputs are (B, 1, size, size) images in [-1, 1] with background -1.
    """

    def __init__(
        self, size: int = 16, channels: tuple[int, int] = (16, 32), feature_dim: int = 64, num_classes: int = 10
    ):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        channels = tuple(channels)
        if len(channels) != 2 or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"channels must be two positive ints, got {channels!r}")
        for name, value in (("feature_dim", feature_dim), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < (2 if name == "num_classes" else 1):
                raise ValueError(f"{name} must be a positive int (num_classes >= 2), got {value!r}")
        self.config = {"size": size, "channels": list(channels), "feature_dim": feature_dim, "num_classes": num_classes}
        self.size, self.feature_dim, self.num_classes = size, feature_dim, num_classes
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # 16 -> 4x4 already; 32 -> 8x8 averaged to 4x4
            nn.Flatten(),
        )
        self.feature = nn.Linear(c2 * 16, feature_dim)
        self.classify = nn.Linear(feature_dim, num_classes)

    def check_input(self, x: Tensor) -> Tensor:
        """Fail loudly on a wrong shape or dtype instead of classifying garbage."""
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, self.size, self.size):
            raise ValueError(
                f"x must have shape (B, 1, {self.size}, {self.size}) for this classifier, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor scaled to [-1, 1], got dtype {x.dtype}")
        return x

    def features(self, x: Tensor) -> Tensor:
        """(B, feature_dim) penultimate features: the space digits FD is measured in."""
        x = self.check_input(x).to(self.feature.weight.dtype)
        return F.relu(self.feature(self.body(x)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, num_classes) logits."""
        return self.classify(self.features(x))


# ---------------------------------------------------------------- save / load
def save_classifier(model: DigitsClassifier, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write config.json (architecture + optional ``meta`` such as the recipe and accuracy) and
    model.safetensors into ``out_dir``; returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(model.config)
    if meta:
        config["meta"] = meta
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def load_classifier(path: str | Path) -> DigitsClassifier:
    """Load a classifier saved by ``save_classifier`` (in eval mode, on CPU).

    Unknown config keys, missing or unexpected weights and shape mismatches raise ValueError
    rather than leaving a half-initialised network.
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"digits classifier file not found: {p} (a directory written by save_classifier)")
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    config.pop("meta", None)
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    missing = sorted(set(CONFIG_KEYS) - set(config))
    if unknown or missing:
        raise ValueError(
            f"{config_path}: unknown keys {unknown}, missing keys {missing}; allowed keys are {list(CONFIG_KEYS)} "
            "and 'meta'"
        )
    config["channels"] = tuple(config["channels"])
    model = DigitsClassifier(**config)
    state = load_tensors(weights_path)
    expected = model.state_dict()
    unexpected, absent = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unexpected or absent:
        raise ValueError(f"{weights_path}: unexpected tensors {unexpected}, missing tensors {absent}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config needs "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    return model.eval()


def load_digits_classifier(size: int = 16) -> DigitsClassifier:
    """The classifier shipped with difflab for ``size`` x ``size`` digits (eval mode, CPU)."""
    if size not in SIZES:
        raise ValueError(f"a pretrained digits classifier ships for sizes {SIZES}, got {size!r}")
    path = PRETRAINED_DIR / f"size{size}"
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"the shipped digits classifier for size {size} is missing at {path}; reproduce it with the command "
            f"in {PRETRAINED_DIR / 'recipe.md'}"
        )
    return load_classifier(path)


# ---------------------------------------------------------------- data, training, accuracy
def digits_tensors(split: str, size: int) -> tuple[Tensor, Tensor]:
    """All images (N, 1, size, size) and labels (N,) of a digits split, stacked."""
    from difflab.data import get_dataset

    dataset = get_dataset("digits", split=split, size=size)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["x"] for it in items]), torch.stack([torch.as_tensor(it["y"]) for it in items])


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def random_outliers(n: int, size: int, generator: torch.Generator) -> Tensor:
    """``n`` images that are no digit: blank frames at a random grey level, pixel noise, and noise
    blurred into blobs. Training them toward a uniform prediction (outlier exposure) keeps the
    classifier from being confident on noise, so "confident share" means something."""
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=generator)
    level = torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1
    noise = torch.rand(n, 1, size, size, generator=generator) * 2 - 1
    blobs = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    blobs = (blobs / blobs.flatten(1).std(1).view(n, 1, 1, 1) * 0.6).clamp(-1, 1)
    return torch.where(kind == 0, level.expand_as(noise), torch.where(kind == 1, noise, blobs))


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Share of ``images`` whose arg-max class equals ``labels``."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    model.train(was_training)
    return correct / len(images)


def train_digits_classifier(
    size: int = 16,
    steps: int = 800,
    seed: int = 0,
    out_dir: str | Path | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    max_shift: int | None = None,
    outlier_weight: float = 0.5,
    log_every: int = 0,
) -> tuple[DigitsClassifier, float]:
    """Train on the fixed digits train split; returns (model in eval mode, test accuracy).

    Adam with a cosine-decayed learning rate and small random shifts (default size // 16 pixels:
    1 at 16x16, 2 at 32x32). Each batch also holds batch_size // 4 non-digit images
    (``random_outliers``) whose cross-entropy to the uniform distribution is added with weight
    ``outlier_weight``. With ``out_dir`` the model is saved there with its recipe as meta.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(outlier_weight, int | float) or not math.isfinite(outlier_weight) or outlier_weight < 0:
        raise ValueError(f"outlier_weight must be a finite number >= 0, got {outlier_weight!r}")
    max_shift = size // 16 if max_shift is None else max_shift
    if not isinstance(max_shift, int) or not 0 <= max_shift < size // 2:
        raise ValueError(f"max_shift must be an int in [0, {size // 2}), got {max_shift!r}")
    train_x, train_y = digits_tensors("train", size)
    test_x, test_y = digits_tensors("test", size)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = DigitsClassifier(size=size)
    generator = torch.Generator().manual_seed(seed)
    n_out = batch_size // 4 if outlier_weight > 0 else 0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(train_x), (batch_size,), generator=generator)
        x = random_shift(train_x[index], max_shift, generator)
        if n_out:
            x = torch.cat([x, random_outliers(n_out, size, generator)])
        logits = model(x)
        loss = F.cross_entropy(logits[:batch_size], train_y[index])
        if n_out:
            loss = loss - outlier_weight * logits[batch_size:].log_softmax(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} test acc {accuracy(model, test_x, test_y):.4f}")
    model.eval()
    test_acc = accuracy(model, test_x, test_y)
    if out_dir is not None:
        meta = {
            "recipe": "difflab.eval.digits_classifier.train_digits_classifier",
            "steps": steps,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "max_shift": max_shift,
            "outlier_weight": outlier_weight,
            "test_accuracy": round(test_acc, 4),
            "train_accuracy": round(accuracy(model, train_x, train_y), 4),
        }
        save_classifier(model, out_dir, meta)
    return model, test_acc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digits classifier used for digits FD.")
    parser.add_argument("--size", type=int, default=16, choices=SIZES)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default=None, help="directory for config.json + model.safetensors")
    parser.add_argument("--log-every", type=int, default=250)
    args = parser.parse_args(argv)
    _, test_acc = train_digits_classifier(args.size, args.steps, args.seed, args.out, log_every=args.log_every)
    print(f"size {args.size}: test accuracy {test_acc:.4f}" + (f", saved to {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
