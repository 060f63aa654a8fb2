"""FID with torchvision's Inception-v3, for users who have its ImageNet weights on disk.

Why optional: difflab never downloads anything, and torchvision is not a dependency. Point
``weights_path`` (or the environment variable ``DIFFLAB_INCEPTION_WEIGHTS``) at the weights of
``torchvision.models.inception_v3`` (IMAGENET1K_V1) as .safetensors or as a .pth/.pt state dict;
a .pth is read with ``torch.load(weights_only=True)``, which refuses pickled code.

Caveat: the FID papers report numbers with the TensorFlow Inception graph (pytorch-fid's port);
torchvision's weights give FIDs of the same meaning but not numerically comparable with those.
For digits use ``difflab.eval.metrics.digits_metrics`` instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.eval.frechet import frechet_distance

ENV_VAR = "DIFFLAB_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt")


def inception_weights_path(weights_path: str | Path | None = None) -> Path:
    """The weights file: ``weights_path`` if given, else ``$DIFFLAB_INCEPTION_WEIGHTS``."""
    if weights_path is None:
        weights_path = os.environ.get(ENV_VAR) or None
    if weights_path is None:
        raise ValueError(
            f"no Inception-v3 weights given: pass weights_path or set {ENV_VAR} to a local .safetensors or .pth "
            "file of torchvision's inception_v3 (difflab never downloads weights)"
        )
    path = Path(weights_path).expanduser()
    if path.suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise ValueError(
            f"Inception weights must be a {' / '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} file, got {str(path)!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"Inception-v3 weights file not found: {path}")
    return path


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file, or of a .pth state dict read without unpickling code."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        from difflab.tensorfiles import load_tensors

        return load_tensors(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} must hold a state dict (parameter name -> tensor), got {type(state).__name__}")
    return state


def _import_torchvision_models():
    try:
        from torchvision import models
    except ImportError as err:
        raise ImportError(
            "Inception FID needs the 'torchvision' package, which difflab does not install: pip install torchvision"
        ) from err
    return models


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] (B, 1 or 3, H, W) -> (B, 2048) pool3 features of Inception-v3.

    Grey images are repeated to RGB and everything is resized bilinearly to 299x299. The net is
    built with ``transform_input=False``: torchvision's ImageNet weights expect [-1, 1] inputs
    after its own transform, which is exactly our data range.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        net.fc = nn.Identity()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"images must have shape (B, 1 or 3, H, W) in [-1, 1], got {got}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.clamp(-1, 1).to(next(self.net.parameters()).dtype)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.net(x)


def load_inception(weights_path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """torchvision's Inception-v3 with local ImageNet weights, as a feature extractor (eval mode)."""
    path = inception_weights_path(weights_path)
    models = _import_torchvision_models()
    net = models.inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=False)
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("AuxLogits.")}
    expected = net.state_dict()
    unexpected = sorted(set(state) - set(expected))
    # older checkpoints lack BatchNorm's step counters, which inference never reads
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise ValueError(
            f"{path} does not hold torchvision inception_v3 weights: unexpected {unexpected[:5]}, "
            f"missing {missing[:5]} ({len(unexpected)} / {len(missing)} in all)"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name!r} has shape {tuple(tensor.shape)}, needs {tuple(expected[name].shape)}")
    net.load_state_dict(state, strict=False)  # keys checked above
    return InceptionFeatures(net).to(device)


def inception_features(model: InceptionFeatures, images: Tensor, batch_size: int = 50) -> Tensor:
    """(N, 2048) features of ``images`` on CPU, computed in batches on the model's device."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def inception_fid(
    samples: Tensor, real_images: Tensor, weights_path: str | Path | None = None, batch_size: int = 50, device="cpu"
) -> float:
    """FID between ``samples`` and ``real_images`` (both (N, 1 or 3, H, W) in [-1, 1])."""
    model = load_inception(weights_path, device)
    return frechet_distance(
        inception_features(model, samples, batch_size), inception_features(model, real_images, batch_size)
    )
