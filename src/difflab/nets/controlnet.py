"""ControlNet (Zhang, Rao & Agrawala 2023): spatial control of a locked diffusion U-Net.

A trainable copy of the base U-Net's encoder (its time/label/context embeddings, input
handling, input conv, down path and middle block: a `UNet` built from the base's config, with
the base's weights, and without its up path) reads the noisy image, the condition and a control
image (a mask, an edge map). A 1x1 convolution initialised at zero after each stored skip and
after the middle block turns its features into residuals, which the locked U-Net adds to its own
skips and middle output (its ``cond["control"]`` hook, see `UNet.control_shapes`). The control
image enters through a small convolutional hint encoder whose last convolution is zero too; its
output is added to the copy's first feature map.

Why zeros: at initialisation every residual is exactly 0, so the controlled model is exactly
the base model and training can only add control to it, never first damage what the base
knows. The zero convolutions' own gradients are not zero (they see the copy's features), so the
first update moves them, and through them the rest of the branch.

`ControlledUNet` joins a locked base (a `UNet` or a `TextConditionalUNet`) and its ControlNet
into one network, ``forward(x, t, cond)`` with the control image in ``cond["hint"]``, so every
sampler, classifier-free guidance and the pipelines use it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import ConfigModule, NetConfig, check_bool, check_cond, check_image, check_int, check_int_tuple
from .layers import zero_module
from .unet import UNet, UNetConfig

GUESS_MODE_DECAY = 0.825  # ControlNet's guess mode: residual k levels above the middle block is scaled by 0.825^k
CONTROL_KEYS = ("hint", "control_strength", "guess_mode")  # the cond entries a ControlledUNet reads itself


@dataclass(frozen=True)
class ControlNetConfig(NetConfig):
    """unet: the base U-Net's settings (``UNet.config.to_dict()``; for a `TextConditionalUNet`, its
    inner U-Net's, context_dim included); the trainable copy is built from them, so its weights
    fit the base's one for one. hint_channels: channels of the control image. hint_widths: the
    widths of the hint encoder's convolutions; hint_downsample: how many of its steps between
    widths halve the resolution, for a control image 2**hint_downsample times the sample's size
    (a latent model's image-sized control)."""

    unet: dict = field(default_factory=dict)
    hint_channels: int = 1
    hint_widths: tuple[int, ...] = (16, 32)
    hint_downsample: int = 0

    def validate(self) -> None:
        if not isinstance(self.unet, dict) or not self.unet:
            raise ValueError(f"unet must be the base U-Net's settings (a non-empty dict), got {self.unet!r}")
        if self.unet.get("class", "UNet") != "UNet":
            raise ValueError(f'unet must describe a "UNet" (the base\'s denoising U-Net), got {self.unet["class"]!r}')
        check_int("hint_channels", self.hint_channels, 1)
        check_int_tuple("hint_widths", self.hint_widths, 1, allow_empty=False)
        check_int("hint_downsample", self.hint_downsample, 0)
        if self.hint_downsample > len(self.hint_widths) - 1:
            raise ValueError(
                f"hint_downsample = {self.hint_downsample} needs at least {self.hint_downsample + 1} hint_widths "
                f"(one stride-2 step between two widths), got {list(self.hint_widths)}"
            )


def unet_settings(settings: dict) -> dict:
    """A U-Net config dict without its "class" key."""
    return {k: v for k, v in settings.items() if k != "class"}


def base_unet(base: nn.Module) -> UNet:
    """The denoising U-Net of a base network: the network itself, or a TextConditionalUNet's U-Net."""
    if isinstance(base, UNet):
        return base
    inner = getattr(base, "unet", None)
    if isinstance(inner, UNet):
        return inner
    raise ValueError(f"a ControlNet controls a UNet or a TextConditionalUNet, got {type(base).__name__}")


def hint_encoder(config: ControlNetConfig, out_channels: int) -> nn.Sequential:
    """Control image -> features of the copy's first feature map: 3x3 convolutions with SiLU,
    widening (and, hint_downsample times, halving the resolution) step by step, ending in a zero
    convolution."""
    widths = config.hint_widths
    layers: list[nn.Module] = [nn.Conv2d(config.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        stride = 2 if i < config.hint_downsample else 1
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=stride), nn.SiLU()]
    layers.append(zero_module(nn.Conv2d(widths[-1], out_channels, 3, padding=1)))
    return nn.Sequential(*layers)


class ControlNet(ConfigModule):
    """``forward(x, t, cond, hint) -> residuals``: one per entry of the base's
    ``UNet.control_shapes`` (the skips in the order the down path stores them, then the middle
    block), each scaled by ``strength`` and, in guess mode, by 0.825^k for the residual k levels
    above the middle one. ``cond`` holds the base U-Net's own entries ("y", "context", ...).
    Build one for a trained base with :meth:`from_base`."""

    config_class = ControlNetConfig
    config: ControlNetConfig

    def __init__(self, config: ControlNetConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        copy = UNet(unet_settings(cfg.unet))
        copy.up_blocks = nn.ModuleList()  # the copy is the encoder half: no up path, no output conv
        copy.out = nn.Identity()
        self.trainable_copy = copy
        self.hint_encoder = hint_encoder(cfg, copy.encoder.input_conv.out_channels)
        channels = [c for c, _ in copy.encoder.skip_specs] + [copy.encoder.out_channels]
        # one zero 1x1 convolution per stored skip, the last one for the middle block
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in channels)

    # ----------------------------------------------------------------- building from a base
    @classmethod
    def from_base(cls, base: nn.Module, **settings: Any) -> ControlNet:
        """A ControlNet for ``base`` (a UNet or TextConditionalUNet) whose copy starts from the
        base's weights, on the base's device and dtype; ``settings``: hint_channels, hint_widths,
        hint_downsample."""
        unet = base_unet(base)
        weight = next(unet.parameters())
        net = cls(unet=unet.config.to_dict(), **settings).to(device=weight.device, dtype=weight.dtype)
        net.load_base_weights(base)
        return net

    def load_base_weights(self, base: nn.Module) -> None:
        """Copy the base U-Net's embeddings, input conv, down path and middle block into the copy."""
        unet = base_unet(base)
        if unet.config != self.base_config:
            raise ValueError("the base U-Net's config differs from the one this ControlNet was built for")
        missing, unexpected = self.trainable_copy.load_state_dict(unet.state_dict(), strict=False)
        decoder = [k for k in unexpected if not k.startswith(("up_blocks.", "out."))]
        if missing or decoder:
            raise ValueError(f"the base's weights do not fit the copy: missing {missing}, unexpected {decoder}")

    @property
    def base_config(self) -> UNetConfig:
        return self.trainable_copy.config

    @property
    def num_residuals(self) -> int:
        return len(self.zero_convs)

    def hint_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the control image for samples of height x width."""
        f = 2**self.config.hint_downsample
        return height * f, width * f

    # ----------------------------------------------------------------- forward
    def check_hint(self, hint: Any, x: torch.Tensor) -> torch.Tensor:
        """The control image as (B, hint_channels, H', W') in x's dtype, or a ValueError naming the
        shape found and the one expected."""
        channels = self.config.hint_channels
        size = self.hint_size(x.shape[2], x.shape[3])
        if not isinstance(hint, torch.Tensor) or hint.ndim != 4 or not hint.is_floating_point():
            got = tuple(hint.shape) if isinstance(hint, torch.Tensor) else type(hint).__name__
            expected = f"(B, {channels}, {size[0]}, {size[1]})"
            raise ValueError(f"the control image must be a float {expected} tensor, got {got}")
        if hint.shape[1] != channels:
            raise ValueError(f"the control image has {hint.shape[1]} channel(s); this ControlNet takes {channels}")
        if tuple(hint.shape[2:]) != size:
            raise ValueError(
                f"the control image is {hint.shape[2]}x{hint.shape[3]}; this ControlNet takes {size[0]}x{size[1]} "
                f"for {x.shape[2]}x{x.shape[3]} samples"
            )
        if hint.shape[0] != x.shape[0]:
            raise ValueError(f"got {hint.shape[0]} control images for a batch of {x.shape[0]}")
        return hint.to(x.dtype)

    def level_scales(self, strength: Any, guess_mode: Any, batch: int, device) -> list[torch.Tensor]:
        """One (B, 1, 1, 1) factor per residual: strength (a number or (B,)) times, where guess
        mode is on (a bool or (B,) bools), 0.825^k for the residual k levels above the middle."""
        strength = torch.as_tensor(strength, dtype=torch.float32, device=device)
        guess = torch.as_tensor(guess_mode, device=device)
        if strength.ndim > 1 or (strength.ndim == 1 and strength.shape[0] != batch) or not strength.isfinite().all():
            raise ValueError(f"control strength must be a finite number or {batch} of them, got {strength.tolist()}")
        if guess.dtype != torch.bool or guess.ndim > 1 or (guess.ndim == 1 and guess.shape[0] != batch):
            raise ValueError(f"guess_mode must be a bool or {batch} bools, got {guess.tolist()}")
        strength, guess = strength.expand(batch), guess.expand(batch)
        k_max = self.num_residuals - 1
        scales = []
        for i in range(self.num_residuals):
            level = torch.where(guess, GUESS_MODE_DECAY ** float(k_max - i), 1.0)
            scales.append((strength * level).view(batch, 1, 1, 1))
        return scales

    def forward(
        self, x: torch.Tensor, t: Any, cond: dict | None = None, hint: Any = None, strength: Any = 1.0,
        guess_mode: Any = False,
    ) -> list[torch.Tensor]:  # fmt: skip
        copy = self.trainable_copy
        allowed = [k for k in copy.accepted_cond if k != "control"]
        cond = check_cond(cond, allowed, "ControlNet", "the base U-Net's condition; the control image is `hint`")
        check_image(x, self.base_config.in_channels, "ControlNet")
        hint = self.check_hint(hint, x)
        h, emb, context, context_mask = copy.prepare_inputs(x, t, cond)
        h, skips = copy.encoder(h, emb, context, context_mask, input_residual=self.hint_encoder(hint))
        features = [*skips, h]
        scales = self.level_scales(strength, guess_mode, x.shape[0], x.device)
        return [conv(f) * s.to(f.dtype) for conv, f, s in zip(self.zero_convs, features, scales, strict=True)]


# --------------------------------------------------------------------------- base + control


class ControlledUNet(nn.Module):
    """A locked base network and its ControlNet as one network: ``forward(x, t, cond)`` with the
    control image in ``cond["hint"]`` (B, hint_channels, H', W'), optionally
    ``cond["control_strength"]`` (B,) and ``cond["guess_mode"]`` (B,) bools; every other entry
    is the base's (a caption is encoded once, by the base's text encoder, and both branches see
    the same context). Classifier-free guidance concatenates every cond entry, so the
    unconditional half gets the same control image, as in ControlNet. It adds no parameters of
    its own; the training task keeps the base frozen."""

    def __init__(self, base: nn.Module, control: nn.Module):
        super().__init__()
        inner = getattr(control, "module", control)  # DistributedDataParallel
        if not isinstance(inner, ControlNet):
            raise ValueError(f"control must be a ControlNet, got {type(inner).__name__}")
        if base_unet(base).config != inner.base_config:
            raise ValueError(
                "this ControlNet was made for a different base U-Net (their configs differ); "
                "pair a control branch with the base it was trained on"
            )
        self.base, self.control = base, control

    @property
    def text_encoder(self) -> nn.Module | None:
        return getattr(self.base, "text_encoder", None)

    def encode(self, captions: Sequence[str], device: torch.device | str | None = None) -> dict:
        if self.text_encoder is None:
            raise ValueError(f"the base {type(self.base).__name__} is not text-conditional")
        return self.base.encode(captions, device=device)

    def forward(self, x: torch.Tensor, t: Any, cond: dict | None = None) -> torch.Tensor:
        cond = {k: v for k, v in (cond or {}).items() if v is not None}
        if "hint" not in cond:
            raise ValueError('a controlled model needs the control image in cond["hint"] (B, C, H, W)')
        if "control" in cond:
            raise ValueError('cond["control"] is what the control branch computes; give the control image as "hint"')
        hint = cond.pop("hint")
        strength, guess = cond.pop("control_strength", 1.0), cond.pop("guess_mode", False)
        if "caption" in cond and self.text_encoder is not None:
            captions = cond.pop("caption")
            if isinstance(captions, str) or not isinstance(captions, Sequence) or len(captions) != x.shape[0]:
                raise ValueError(f'cond["caption"] must be a list of {x.shape[0]} strings, got {captions!r}')
            if "context" in cond:
                raise ValueError('give cond["caption"] or cond["context"], not both')
            cond.update(self.encode(list(captions), device=x.device))
        residuals = self.control(x, t, cond, hint, strength, guess)
        return self.base(x, t, {**cond, "control": residuals})


def control_condition(
    hint: torch.Tensor, n: int, strength: float = 1.0, guess_mode: bool = False, device=None
) -> dict[str, torch.Tensor]:
    """The cond entries of a controlled draw of n samples: the control image (one for all, or one
    per sample) and the strength and guess mode of each sample, as tensors with n rows, so that
    batching (`sample_batched`) and CFG's concatenation carry them like any other entry."""
    if not isinstance(hint, torch.Tensor) or hint.ndim != 4 or hint.shape[0] not in (1, n):
        got = tuple(hint.shape) if isinstance(hint, torch.Tensor) else type(hint).__name__
        raise ValueError(f"the control image must be a (1, C, H, W) or ({n}, C, H, W) tensor, got {got}")
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 <= strength < float("inf"):
        raise ValueError(f"control strength must be a finite number >= 0 (1 = as trained, 0 = the base): {strength!r}")
    check_bool("guess_mode", guess_mode)
    return {
        "hint": hint.to(device).expand(n, *hint.shape[1:]).contiguous(),
        "control_strength": torch.full((n,), float(strength), device=device),
        "guess_mode": torch.full((n,), bool(guess_mode), device=device),
    }
