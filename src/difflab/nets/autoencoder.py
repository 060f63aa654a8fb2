"""Convolutional autoencoder for latent diffusion (perceptual compression, Rombach et al. 2022).

The encoder maps a (B, C, H, W) image to a (B, c, H/f, W/f) latent, f = 2^(len(channel_mult) - 1);
the decoder maps it back. The latent is regularised so a diffusion model can work on it:

* ``regularization="kl"``: the encoder outputs a diagonal Gaussian posterior
  (:class:`DiagonalGaussian`); a small KL weight towards N(0, I) keeps the latent
  from spreading arbitrarily while hardly limiting reconstructions.
* ``regularization="vq"``: a vector quantizer. As in LDM it sits at the start of the
  decoder: ``encode`` returns the unquantized latent and ``decode`` quantizes it first, so
  a diffusion model trained on unquantized latents can be decoded.

Diffusion wants unit-variance data, so the autoencoder owns a ``scale_factor`` (a buffer,
saved with the weights): set it with :meth:`Autoencoder.compute_scale_factor` (1 / std of
encoded latents) and use :meth:`Autoencoder.encode_scaled` / :meth:`Autoencoder.decode_scaled`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    ConfigModule,
    NetConfig,
    check_bool,
    check_image,
    check_int,
    check_int_tuple,
    check_optional_int,
    check_probability,
)
from .layers import Downsample, SpatialSelfAttention, Upsample, zero_module
from .quantizer import Quantized, VectorQuantizer

REGULARIZATIONS = ("kl", "vq")
# Log-variance range of the KL posterior (as in LDM): keeps exp(logvar) finite in fp32.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AutoencoderConfig(NetConfig):
    """Autoencoder settings. Defaults: f = 4, 4 latent channels, KL-regularised.

    channel_mult: width multiplier per level; the encoder halves H and W between levels.
    attention_resolutions: downsampling factors (1, 2, 4, ...) whose levels get self-attention.
    num_codes, commitment_beta, dead_code_patience: the vector quantizer (used when
    regularization is "vq"); dead_code_patience = 0 turns dead-code restarts off.
    """

    in_channels: int = 3
    out_channels: int | None = None
    latent_channels: int = 4
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    mid_attention: bool = True
    num_heads: int = 1
    norm_groups: int = 32
    dropout: float = 0.0
    regularization: str = "kl"
    num_codes: int = 512
    commitment_beta: float = 0.25
    dead_code_patience: int = 100

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        check_int("in_channels", self.in_channels, 1)
        check_optional_int("out_channels", self.out_channels, 1)
        check_int("latent_channels", self.latent_channels, 1)
        check_int("model_channels", self.model_channels, 1)
        check_int_tuple("channel_mult", self.channel_mult, 1, allow_empty=False)
        check_int("num_res_blocks", self.num_res_blocks, 0)
        check_int_tuple("attention_resolutions", self.attention_resolutions, 1, allow_empty=True)
        factors = [2**level for level in range(len(self.channel_mult))]
        for factor in self.attention_resolutions:
            if factor not in factors:
                raise ValueError(
                    f"attention_resolutions entry {factor} is not a downsampling factor of this "
                    f"autoencoder; allowed: {factors}"
                )
        check_bool("mid_attention", self.mid_attention)
        check_int("num_heads", self.num_heads, 1)
        check_int("norm_groups", self.norm_groups, 1)
        check_probability("dropout", self.dropout, allow_one=False)
        for width in (self.model_channels * m for m in self.channel_mult):
            if width % self.norm_groups:
                raise ValueError(
                    f"channel width {width} (model_channels * channel_mult) is not divisible by "
                    f"norm_groups={self.norm_groups}"
                )
            if width % self.num_heads:
                raise ValueError(f"channel width {width} is not divisible by num_heads={self.num_heads}")
        if self.regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {self.regularization!r}")
        check_int("num_codes", self.num_codes, 1)
        beta = self.commitment_beta
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta >= 0:
            raise ValueError(f"commitment_beta must be a number >= 0, got {beta!r}")
        check_int("dead_code_patience", self.dead_code_patience, 0)


# --------------------------------------------------------------------------- posterior


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from encoder output (B, 2c, h, w) = [mean, logvar].

    The log-variance is clamped to [LOGVAR_MIN, LOGVAR_MAX] so var and std stay finite.
    """

    def __init__(self, parameters: Tensor):
        if parameters.dim() != 4 or parameters.shape[1] % 2:
            raise ValueError(f"DiagonalGaussian needs (B, 2c, h, w) parameters, got {tuple(parameters.shape)}")
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.var = torch.exp(self.logvar)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * eps (reparameterised, so gradients reach mean and logvar)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per example, (B,): 0.5 * sum(mean^2 + var - 1 - logvar)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


@dataclass
class AutoencoderOutput:
    """One pass of :meth:`Autoencoder.forward`; the loss reads the part of its regulariser."""

    reconstruction: Tensor
    latent: Tensor  # what was decoded: a posterior sample or mode (KL), the unquantized latent (VQ)
    posterior: DiagonalGaussian | None = None  # KL autoencoders
    quantized: Quantized | None = None  # VQ autoencoders


# --------------------------------------------------------------------------- blocks


class ConvResBlock(nn.Module):
    """Unconditioned residual block (norm, SiLU, conv, twice); the last conv starts at zero
    so a fresh block is the identity (or its 1x1 skip when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float):
        super().__init__()
        self.in_norm = nn.GroupNorm(norm_groups, in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.out_norm = nn.GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        h = self.out_conv(self.dropout(F.silu(self.out_norm(h))))
        return self.skip(x) + h


def _stage(cfg: AutoencoderConfig, in_channels: int, out_channels: int, blocks: int, attend: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers.append(ConvResBlock(in_channels, out_channels, cfg.norm_groups, cfg.dropout))
        in_channels = out_channels
        if attend:
            layers.append(SpatialSelfAttention(out_channels, cfg.num_heads, cfg.norm_groups, False))
    return layers


def _middle(cfg: AutoencoderConfig, channels: int) -> nn.Sequential:
    layers: list[nn.Module] = [ConvResBlock(channels, channels, cfg.norm_groups, cfg.dropout)]
    if cfg.mid_attention:
        layers.append(SpatialSelfAttention(channels, cfg.num_heads, cfg.norm_groups, False))
    layers.append(ConvResBlock(channels, channels, cfg.norm_groups, cfg.dropout))
    return nn.Sequential(*layers)


def _head(cfg: AutoencoderConfig, channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.GroupNorm(cfg.norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
    )


class Encoder(nn.Module):
    """Image (B, C, H, W) -> (B, out_channels, H/f, W/f): input conv, per level res blocks
    (+ attention) and a stride-2 conv between levels, middle block, norm + conv head."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        widths = [cfg.model_channels * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)]
        channels = widths[0]
        for level, width in enumerate(widths):
            attend = 2**level in cfg.attention_resolutions
            layers += _stage(cfg, channels, width, cfg.num_res_blocks, attend)
            channels = width
            if level < len(widths) - 1:
                layers.append(Downsample(channels, use_conv=True))
        layers += [_middle(cfg, channels), _head(cfg, channels, out_channels)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """Latent (B, c, h, w) -> image (B, C, h*f, w*f), mirroring the encoder with one more
    res block per level (as in LDM: decoding is the harder direction)."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        widths = [cfg.model_channels * m for m in cfg.channel_mult]
        channels = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, channels, 3, padding=1), _middle(cfg, channels)]
        for level in reversed(range(len(widths))):
            attend = 2**level in cfg.attention_resolutions
            layers += _stage(cfg, channels, widths[level], cfg.num_res_blocks + 1, attend)
            channels = widths[level]
            if level > 0:
                layers.append(Upsample(channels, use_conv=True))
        self.head = _head(cfg, channels, out_channels)
        self.layers = nn.Sequential(*layers)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the output conv: where the adaptive GAN weight compares gradient norms."""
        return self.head[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.layers(z))


# --------------------------------------------------------------------------- autoencoder


class Autoencoder(ConfigModule):
    """KL- or VQ-regularised autoencoder: ``encode``, ``decode``, ``forward`` and the latent scale."""

    config_class = AutoencoderConfig
    config: AutoencoderConfig

    def __init__(self, config: AutoencoderConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        is_kl = cfg.regularization == "kl"
        self.encoder = Encoder(cfg, 2 * cfg.latent_channels if is_kl else cfg.latent_channels)
        self.quantizer = (
            None
            if is_kl
            else VectorQuantizer(cfg.num_codes, cfg.latent_channels, cfg.commitment_beta, cfg.dead_code_patience)
        )
        self.decoder = Decoder(cfg, cfg.out_channels or cfg.in_channels)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    # ----------------------------------------------------------------- introspection

    @property
    def downsampling_factor(self) -> int:
        """f: the latent is H/f x W/f (H and W must be multiples of f)."""
        return self.config.downsampling_factor

    @property
    def last_layer(self) -> nn.Parameter:
        return self.decoder.last_layer

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(c, h, w) of the latent of an H x W image."""
        self._check_size(height, width)
        f = self.downsampling_factor
        return (self.config.latent_channels, height // f, width // f)

    def _check_size(self, height: int, width: int) -> None:
        f = self.downsampling_factor
        if height % f or width % f:
            raise ValueError(f"Autoencoder input H and W must be multiples of f={f}, got {height}x{width}")

    def _check_latent(self, z: Any) -> None:
        c = self.config.latent_channels
        if not isinstance(z, Tensor) or z.dim() != 4 or not z.is_floating_point() or z.shape[1] != c:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"Autoencoder expects a float (B, {c}, h, w) latent, got {shape}")

    # ----------------------------------------------------------------- encode / decode

    def encode(self, x: Tensor) -> DiagonalGaussian | Tensor:
        """KL: the posterior q(z | x); VQ: the unquantized latent (decode quantizes it)."""
        check_image(x, self.config.in_channels, "Autoencoder")
        self._check_size(x.shape[2], x.shape[3])
        h = self.encoder(x)
        return DiagonalGaussian(h) if self.quantizer is None else h

    def quantize(self, z: Tensor, generator: torch.Generator | None = None) -> Quantized:
        if self.quantizer is None:
            raise ValueError('quantize needs a VQ autoencoder (regularization="vq"); this one is "kl"')
        self._check_latent(z)
        return self.quantizer(z, generator)

    def decode(self, z: Tensor) -> Tensor:
        """Latent -> image; a VQ autoencoder first snaps z to its nearest codes."""
        self._check_latent(z)
        if self.quantizer is not None:
            z = self.quantizer.snap(z)
        return self.decoder(z)

    def forward(
        self, x: Tensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> AutoencoderOutput:
        """Encode, regularise and decode; ``sample_posterior=False`` decodes the posterior mean (KL)."""
        encoded = self.encode(x)
        if isinstance(encoded, DiagonalGaussian):
            z = encoded.sample(generator) if sample_posterior else encoded.mode()
            return AutoencoderOutput(self.decoder(z), z, posterior=encoded)
        quantized = self.quantizer(encoded, generator)
        return AutoencoderOutput(self.decoder(quantized.quantized), encoded, quantized=quantized)

    # ----------------------------------------------------------------- latent scale

    def latent(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """The unscaled latent of x: posterior mode (or a sample) for KL, unquantized latent for VQ."""
        encoded = self.encode(x)
        if isinstance(encoded, DiagonalGaussian):
            return encoded.sample(generator) if sample else encoded.mode()
        return encoded

    @torch.no_grad()
    def compute_scale_factor(self, latents: Tensor) -> float:
        """Set ``scale_factor`` = 1 / std(latents) (all elements) and return it.

        ``latents`` are unscaled latents of representative data (see :meth:`latent`);
        afterwards ``encode_scaled`` gives latents of unit variance on that data.
        """
        if not isinstance(latents, Tensor) or not latents.is_floating_point() or latents.numel() < 2:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"compute_scale_factor needs a float tensor of at least 2 latent values, got {got}")
        std = latents.detach().double().std()
        if not (torch.isfinite(std) and std > 0):
            raise ValueError(f"latents must have a finite, positive standard deviation to scale by, got {float(std)}")
        self.scale_factor.fill_(float(1.0 / std))
        return float(self.scale_factor)

    def encode_scaled(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """scale_factor * latent(x): what a latent diffusion model is trained on."""
        return self.latent(x, sample=sample, generator=generator) * self.scale_factor

    def decode_scaled(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`encode_scaled` up to reconstruction: decode(z / scale_factor)."""
        self._check_latent(z)
        return self.decode(z / self.scale_factor)
