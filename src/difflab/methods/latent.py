"""Perceptual compression for latent diffusion: autoencoder losses, cached latents, PSNR.

Autoencoder objective per example (Esser et al. 2021; Rombach et al. 2022)::

    L = rec + perceptual_weight * lpips + reg + gan_on * disc_weight * lambda * L_G

* rec: mean over pixels of |x - x_hat| ("l1") or (x - x_hat)^2 ("l2").
* reg, KL autoencoders: kl_weight * KL / (number of pixel values). LDM sums its
  reconstruction loss over pixels; dividing the whole LDM objective by the pixel count
  gives this one, so LDM's kl_weight (1e-6) carries over unchanged.
* reg, VQ autoencoders: codebook_weight * (codebook loss + beta * commitment loss),
  both means over latent elements, as in VQGAN.
* L_G = -mean(D(x_hat)) (hinge generator loss); lambda is the adaptive weight, measured at
  the decoder's last layer; gan_on is 0 for the first ``disc_start`` steps.

The discriminator is trained on the hinge loss, see :func:`discriminator_loss`.
LPIPS is optional and never downloaded: pass your own callable ``perceptual(x, x_hat)``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.nets.autoencoder import Autoencoder, AutoencoderOutput
from difflab.nets.discriminator import adaptive_weight, gan_active, hinge_d_loss, hinge_g_loss

RECONSTRUCTIONS = ("l1", "l2")
Perceptual = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """Weights of the autoencoder objective (defaults follow LDM's KL-f8 recipe, except disc_start)."""

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    perceptual_weight: float = 0.0
    disc_weight: float = 0.5
    disc_start: int = 10_000

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {self.reconstruction!r}")
        for name in ("kl_weight", "codebook_weight", "perceptual_weight", "disc_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.disc_start, bool) or not isinstance(self.disc_start, int) or self.disc_start < 0:
            raise ValueError(f"disc_start must be an int >= 0, got {self.disc_start!r}")


def reconstruction_loss(x: Tensor, reconstruction: Tensor, kind: str = "l1") -> Tensor:
    """Per-example mean over pixels of |x - x_hat| ("l1") or (x - x_hat)^2 ("l2"), (B,)."""
    if kind not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {kind!r}")
    if x.shape != reconstruction.shape:
        raise ValueError(f"x {tuple(x.shape)} and reconstruction {tuple(reconstruction.shape)} differ in shape")
    error = reconstruction - x
    error = error.abs() if kind == "l1" else error.pow(2)
    return error.flatten(1).mean(1)


def autoencoder_loss(
    x: Tensor,
    output: AutoencoderOutput,
    *,
    config: AutoencoderLossConfig,
    step: int,
    discriminator: nn.Module | None = None,
    last_layer: Tensor | None = None,
    perceptual: Perceptual | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example autoencoder loss (B,) and scalar logs for ``output = autoencoder(x)``.

    With a ``discriminator`` and ``step >= config.disc_start`` the adaptive-weighted hinge
    generator loss is added; ``last_layer`` (``autoencoder.last_layer``) is then required.
    The discriminator is frozen while it scores the reconstruction, so this loss leaves
    no gradient on it. Without a graph (torch.no_grad, e.g. validation) lambda is 0.
    """
    if config.perceptual_weight > 0 and perceptual is None:
        raise ValueError(
            f"perceptual_weight={config.perceptual_weight} needs an LPIPS callable: pass "
            "perceptual=fn(x, x_hat) -> (B,) distances built from weights you have locally "
            "(difflab ships and downloads none), or set perceptual_weight=0"
        )
    x_hat = output.reconstruction
    rec = reconstruction_loss(x, x_hat, config.reconstruction)
    logs = {"rec_loss": rec.detach().mean()}
    if config.perceptual_weight > 0:
        distances = perceptual(x, x_hat).reshape(-1)
        if distances.shape != rec.shape:
            raise ValueError(f"perceptual(x, x_hat) must give one distance per example {tuple(rec.shape)}, "
                             f"got {tuple(distances.shape)}")
        rec = rec + config.perceptual_weight * distances
        logs["perceptual_loss"] = distances.detach().mean()
    loss = rec + _regularization(x, output, config, logs)

    if discriminator is not None:
        g_loss = torch.zeros_like(rec)
        weight = torch.zeros((), device=rec.device)
        if gan_active(step, config.disc_start):
            if last_layer is None:
                raise ValueError("the GAN term needs last_layer (the decoder's output weight: autoencoder.last_layer)")
            with _frozen(discriminator):
                g_loss = hinge_g_loss(discriminator(x_hat))
            if torch.is_grad_enabled() and g_loss.requires_grad:
                weight = config.disc_weight * adaptive_weight(rec.mean(), g_loss.mean(), last_layer)
            loss = loss + weight * g_loss
        logs["g_loss"] = g_loss.detach().mean()
        logs["gan_weight"] = weight.detach()
    return loss, logs


def _regularization(x: Tensor, output: AutoencoderOutput, config: AutoencoderLossConfig, logs: dict) -> Tensor:
    if output.posterior is not None:
        kl = output.posterior.kl()
        logs["kl_loss"] = kl.detach().mean()
        return config.kl_weight * kl / x[0].numel()
    if output.quantized is not None:
        q = output.quantized
        logs.update(
            codebook_loss=q.codebook_loss.detach().mean(),
            commitment_loss=q.commitment_loss.detach().mean(),
            perplexity=q.perplexity.detach().float(),
            codebook_usage=q.usage.detach(),
        )
        return config.codebook_weight * q.loss
    raise ValueError("output carries neither a posterior (KL) nor a quantization (VQ); pass autoencoder(x)")


def discriminator_loss(
    discriminator: nn.Module, x: Tensor, reconstruction: Tensor, *, config: AutoencoderLossConfig, step: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example hinge loss (B,) of the discriminator on real x vs the (detached) reconstruction.

    Before ``config.disc_start`` the loss is 0 and the discriminator is not run.
    """
    if not gan_active(step, config.disc_start):
        zero = torch.zeros(x.shape[0], device=x.device)
        return zero, {"d_loss": zero.mean(), "logits_real": zero.mean(), "logits_fake": zero.mean()}
    logits_real = discriminator(x.detach())
    logits_fake = discriminator(reconstruction.detach())
    loss = hinge_d_loss(logits_real, logits_fake)
    logs = {
        "d_loss": loss.detach().mean(),
        "logits_real": logits_real.detach().mean(),
        "logits_fake": logits_fake.detach().mean(),
    }
    return loss, logs


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Turn off requires_grad on ``module``'s parameters for the block, then restore it."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


# --------------------------------------------------------------------------- metrics


def psnr(x: Tensor, reconstruction: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per example in dB, (B,): 10 log10(range^2 / MSE).

    data_range is max - min of the pixel scale: 2 for difflab's [-1, 1] images.
    A perfect reconstruction gives inf.
    """
    if isinstance(data_range, bool) or not isinstance(data_range, int | float) or not data_range > 0:
        raise ValueError(f"data_range must be a number > 0, got {data_range!r}")
    mse = reconstruction_loss(x.double(), reconstruction.double(), "l2")
    return (10 * torch.log10(data_range**2 / mse)).to(x.dtype)


# --------------------------------------------------------------------------- the trained pair


class AutoencoderGAN(nn.Module):
    """The autoencoder and its patch discriminator as one module, so that one optimizer, one
    checkpoint and one DDP wrapper hold both.

    ``forward(x, step)`` returns the sum of the two per-example losses. Their gradients do not
    mix: the generator term scores the reconstruction with the discriminator frozen, and the
    discriminator sees detached reconstructions. So one Adam over both parameter sets takes
    exactly the steps of two Adams with the same settings (VQGAN/LDM use the same lr and
    betas for both), as long as gradient clipping is off (clipping would couple them).
    """

    def __init__(
        self,
        autoencoder: Autoencoder,
        discriminator: nn.Module | None,
        loss: AutoencoderLossConfig | None = None,
        perceptual: Perceptual | None = None,
    ):
        super().__init__()
        self.autoencoder, self.discriminator = autoencoder, discriminator
        self.loss_config = loss or AutoencoderLossConfig()
        self.perceptual = perceptual  # a plain callable, not a submodule: never trained or saved

    def forward(self, x: Tensor, step: int, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        config = self.loss_config
        output = self.autoencoder(x, generator=generator)
        loss, logs = autoencoder_loss(
            x, output, config=config, step=step, discriminator=self.discriminator,
            last_layer=self.autoencoder.last_layer, perceptual=self.perceptual,
        )  # fmt: skip
        logs["psnr"] = psnr(x.detach(), output.reconstruction.detach().clamp(-1, 1)).mean()
        if self.discriminator is not None:
            d_loss, d_logs = discriminator_loss(self.discriminator, x, output.reconstruction, config=config, step=step)
            # DDP needs every parameter in every step's graph; before disc_start the
            # discriminator takes part with weight 0
            unused = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
            loss = loss + d_loss + unused
            logs.update(d_logs)
        return loss, logs


def load_lpips(net: str = "vgg") -> Perceptual:
    """LPIPS (Zhang et al. 2018) from the ``lpips`` package, for ``perceptual_weight > 0``.

    Its backbone weights come from torchvision's cache: they must already be on this machine
    (difflab downloads nothing). Distances are per example, (B,), for images in [-1, 1].
    """
    try:
        import lpips
    except ImportError as error:
        raise ValueError(
            "perceptual_weight > 0 needs LPIPS: `pip install lpips` with its torchvision backbone weights already "
            "in the torch hub cache (difflab downloads nothing), or set perceptual_weight = 0"
        ) from error
    model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)

    def distance(x: Tensor, reconstruction: Tensor) -> Tensor:
        return model.to(x.device)(x, reconstruction).flatten()

    return distance


# --------------------------------------------------------------------------- cached latents


@dataclass
class LatentCache:
    """Scaled latents of a data set (N, c, h, w), the scale factor they were scaled by and,
    for a data set of dicts, each item's other fields (labels, captions)."""

    latents: Tensor
    scale_factor: float
    fields: list[dict] | None = None


class LatentDataset(torch.utils.data.Dataset):
    """Items of the encoded data set with "x" replaced by its scaled latent: diffusion trains
    on these exactly as on images, and never runs the encoder again."""

    def __init__(self, cache: LatentCache):
        self.cache = cache
        self.num_classes = None

    @classmethod
    def encode(cls, autoencoder: Autoencoder, dataset, *, batch_size: int = 64) -> LatentDataset:
        """Encode ``dataset`` once (rescaling the autoencoder's scale factor to 1 / std)."""
        latent = cls(encode_dataset(autoencoder, dataset, batch_size=batch_size))
        latent.num_classes = getattr(getattr(dataset, "dataset", dataset), "num_classes", None)
        return latent

    def __len__(self) -> int:
        return len(self.cache.latents)

    def __getitem__(self, i: int) -> dict:
        fields = self.cache.fields[i] if self.cache.fields is not None else {}
        return {**fields, "x": self.cache.latents[i]}


@torch.no_grad()
def encode_dataset(
    autoencoder: Autoencoder,
    data: Tensor | Iterable,
    *,
    batch_size: int = 64,
    rescale: bool = True,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> LatentCache:
    """Encode every image once (batched, no grad, eval mode) for training a diffusion model on latents.

    ``data``: an (N, C, H, W) tensor or a map-style data set whose items are images or
    dicts with "x" (difflab's data sets; their other fields are kept in ``fields``).
    ``rescale=True`` sets the autoencoder's ``scale_factor`` to 1 / std of these latents
    first; False keeps the one it has. KL latents are posterior modes unless
    ``sample=True``; VQ latents are unquantized. Latents are returned on the CPU,
    multiplied by the scale factor.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = autoencoder.scale_factor.device
    was_training = autoencoder.training
    autoencoder.eval()
    chunks, fields = [], []
    try:
        for batch, batch_fields in _image_batches(data, batch_size):
            chunks.append(autoencoder.latent(batch.to(device), sample=sample, generator=generator).float().cpu())
            fields.extend(batch_fields)
    finally:
        autoencoder.train(was_training)
    if sum(len(chunk) for chunk in chunks) == 0:
        raise ValueError("encode_dataset got an empty data set")
    latents = torch.cat(chunks)
    if rescale:
        autoencoder.compute_scale_factor(latents)
    scale = float(autoencoder.scale_factor)
    return LatentCache(latents * scale, scale, fields if any(fields) else None)


def _image_batches(data: Any, batch_size: int) -> Iterator[tuple[Tensor, list[dict]]]:
    """(images, the items' other fields) per batch."""
    if isinstance(data, Tensor):
        for batch in data.split(batch_size) if len(data) else ():
            yield batch, [{} for _ in batch]
        return
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise ValueError(f"data must be an image tensor or a map-style data set, got {type(data).__name__}")
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        if all(isinstance(item, dict) for item in items):
            fields = [{k: v for k, v in item.items() if k != "x"} for item in items]
            yield torch.stack([item["x"] for item in items]), fields
        else:
            yield torch.stack(items), [{} for _ in items]


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """A trained autoencoder (eval mode, frozen) from its folder, the ``model/`` of an
    autoencoder run, or the ``autoencoder/`` of a latent diffusion pipeline."""
    from difflab.nets import load_network

    path = Path(path)
    for directory in (path, path / "model", path / "autoencoder", path / "model" / "autoencoder"):
        config = directory / "config.json"
        if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("class") == "Autoencoder":
            return load_network(directory, device=device).eval().requires_grad_(False)
    raise ValueError(
        f"{path} holds no Autoencoder (config.json + model.safetensors of class Autoencoder, directly or in "
        "model/ or autoencoder/); train one with task = \"autoencoder\""
    )
