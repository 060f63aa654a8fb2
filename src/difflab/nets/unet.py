"""ADM-style U-Net (Dhariwal & Nichol 2021) with every option switchable by config.

Down path: input conv, then per level ``num_res_blocks`` res blocks (+ attention at
the chosen downsampling factors) and a downsample; a middle block (res, attention,
res); an up path that mirrors it, concatenating one stored skip per block; and a
zero-initialised output conv, so a fresh model predicts exactly 0.

Conditioning (``forward(x, t, cond)``): t -> sinusoidal -> MLP gives ``emb``;
``cond["y"]`` adds a class embedding (label ``num_classes`` = null label);
``cond["context"]`` is attended to by cross-attention at every attention location
(and, with ``pooled_context``, its masked mean is added to ``emb`` as well);
``cond["concat"]`` is concatenated to x (and, with ``coordinate_channels``, two maps of the
pixel coordinates); ``cond["aug_level"]`` (with ``aug_level_embedding``) adds an embedding of a
super-resolution stage's augmentation level; ``cond["control"]`` adds residuals to the skips
and the middle block (see :meth:`UNet.control_shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import (
    ConfigModule,
    NetConfig,
    check_bool,
    check_cond,
    check_image,
    check_int,
    check_int_tuple,
    check_optional_int,
    check_probability,
    prepare_timesteps,
    require_cond,
)
from .layers import (
    TIME_ORDERS,
    AugmentationLevelEmbedding,
    BlockFactory,
    ConditionedSequential,
    Downsample,
    GuidanceEmbedding,
    LabelEmbedding,
    TimestepEmbedding,
    Upsample,
    zero_module,
)


@dataclass(frozen=True)
class BackboneConfig(NetConfig):
    """The fields the U-Net and its encoder-only twin (the noisy classifier) share.

    attention_resolutions: downsampling factors (1 = full resolution, 2 = half, ...)
    whose levels get attention. num_res_blocks: one int, or one per level (Imagen's
    efficient U-Net puts more blocks at low resolution). num_head_channels, when set,
    fixes the channels per head instead of num_heads. efficient_updown: every level
    down-samples *before* its blocks and up-samples *after* them, so no res block runs
    at full resolution (factors at level i are then 2^(i+1)).
    """

    in_channels: int = 3
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int | tuple[int, ...] = 2
    attention_resolutions: tuple[int, ...] = (2,)
    mid_attention: bool = True
    dropout: float = 0.0
    num_heads: int = 4
    num_head_channels: int | None = None
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    conv_resample: bool = True
    skip_rescale: bool = False
    norm_groups: int = 32
    efficient_updown: bool = False

    def validate(self) -> None:
        validate_backbone(self)


@dataclass(frozen=True)
class UNetConfig(BackboneConfig):
    """All U-Net settings (the backbone's, see :class:`BackboneConfig`, plus these).
    Defaults give a ~6M-parameter CPU-friendly 32x32 model.

    out_channels: predicted data channels (default in_channels); learn_sigma doubles the
    output channels. class_dropout_prob: the rate at which the training task replaces labels
    by the null label (classifier-free guidance); the network itself never drops them.
    pooled_context: also add the masked mean of the context tokens,
    projected, to the time embedding (GLIDE, Imagen), so every res block sees the caption
    through its scale/shift and not only the few cross-attention layers; small text models
    learn global attributes such as colour far faster with it. coordinate_channels: concatenate
    the x and y coordinate of every pixel (in [-1, 1]) to the input (CoordConv, Liu et al.
    2018): convolutions are translation-equivariant, so without it absolute position ("at the
    top left") must be inferred from the zero padding at the borders.
    guidance_embedding: take the guidance scale ``cond["w"]`` as an input (a guidance-distilled
    student, see `GuidanceEmbedding`). aug_level_embedding: take the noise-conditioning
    augmentation level s in [0, 1] of a super-resolution stage as ``cond["aug_level"]``, embedded
    like the time and added to the time embedding (see `AugmentationLevelEmbedding`).
    image_embed_dim: take a (B, image_embed_dim) embedding ``cond["image_embed"]`` (unCLIP's
    decoder: a CLIP image embedding), projected and added to the time embedding.
    final_block (needs efficient_updown): keep the input conv's full-resolution features as a
    skip and end with one res block at full resolution on them, as Imagen's efficient U-Nets
    do. Without it the output is the last nearest-neighbour upsampling plus one conv, and a
    super-resolution stage has to carry every pixel's detail through half resolution (measured
    on digits 16 -> 32: a striped texture, and downsample(SR(x)) 6x further from x than a
    real image's round trip).

    Four options exist so that diffusers' UNet2DModel maps onto this U-Net exactly
    (`difflab.interop`); their defaults are difflab's own behaviour. norm_eps: every
    GroupNorm's epsilon. time_embedding_order ("cos_sin" or "sin_cos") and
    time_frequency_shift (frequencies max_period^(-i / (half - shift))): the sinusoidal
    features (the original DDPM's are "sin_cos" with shift 1). mid_attention_norm: false
    drops the GroupNorm before the middle block's self-attention.
    """

    out_channels: int | None = None
    num_classes: int | None = None
    class_dropout_prob: float = 0.0
    context_dim: int | None = None
    pooled_context: bool = False
    coordinate_channels: bool = False
    concat_channels: int = 0
    learn_sigma: bool = False
    guidance_embedding: bool = False
    aug_level_embedding: bool = False
    image_embed_dim: int | None = None
    final_block: bool = False
    norm_eps: float = 1e-5
    time_embedding_order: str = "cos_sin"
    time_frequency_shift: float = 0.0
    mid_attention_norm: bool = True

    def validate(self) -> None:
        super().validate()
        check_positive_float("norm_eps", self.norm_eps)
        if self.time_embedding_order not in TIME_ORDERS:
            raise ValueError(
                f"time_embedding_order must be one of {', '.join(TIME_ORDERS)}, got {self.time_embedding_order!r}"
            )
        half = self.model_channels // 2
        shift = self.time_frequency_shift
        if isinstance(shift, bool) or not isinstance(shift, int | float) or not 0 <= shift < half:
            raise ValueError(
                f"time_frequency_shift must be a number in [0, {half}) (model_channels // 2), got {shift!r}"
            )
        check_bool("mid_attention_norm", self.mid_attention_norm)
        check_bool("final_block", self.final_block)
        if self.final_block and not self.efficient_updown:
            raise ValueError("final_block = true needs efficient_updown = true (otherwise the U-Net already "
                             "ends with res blocks at full resolution)")  # fmt: skip
        check_optional_int("out_channels", self.out_channels, 1)
        check_optional_int("num_classes", self.num_classes, 1)
        check_probability("class_dropout_prob", self.class_dropout_prob)
        check_optional_int("context_dim", self.context_dim, 1)
        check_int("concat_channels", self.concat_channels, 0)
        check_bool("learn_sigma", self.learn_sigma)
        check_bool("pooled_context", self.pooled_context)
        check_bool("coordinate_channels", self.coordinate_channels)
        check_bool("guidance_embedding", self.guidance_embedding)
        check_bool("aug_level_embedding", self.aug_level_embedding)
        check_optional_int("image_embed_dim", self.image_embed_dim, 1)
        if self.pooled_context and self.context_dim is None:
            raise ValueError("pooled_context needs context_dim (the width of the context tokens to pool)")
        if self.context_dim is not None and not (
            self.attention_resolutions or self.mid_attention
        ):
            raise ValueError(
                "context_dim needs somewhere to attend: set attention_resolutions or mid_attention"
            )


# --------------------------------------------------------------------------- shared backbone


def check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def res_blocks_per_level(config: Any) -> tuple[int, ...]:
    blocks = config.num_res_blocks
    return (blocks,) * len(config.channel_mult) if isinstance(blocks, int) else tuple(blocks)


def level_factors(config: Any) -> list[int]:
    """Downsampling factor at which each level's res blocks run."""
    offset = 1 if config.efficient_updown else 0
    return [2 ** (level + offset) for level in range(len(config.channel_mult))]


def validate_backbone(config: Any) -> None:
    """Checks shared by the U-Net and the classifier (both use :class:`UNetEncoder`)."""
    check_int("in_channels", config.in_channels, 1)
    check_int("model_channels", config.model_channels, 1)
    check_int_tuple("channel_mult", config.channel_mult, 1, allow_empty=False)
    levels = len(config.channel_mult)
    if isinstance(config.num_res_blocks, tuple):
        check_int_tuple("num_res_blocks", config.num_res_blocks, 0, allow_empty=False)
        if len(config.num_res_blocks) != levels:
            raise ValueError(
                f"num_res_blocks has {len(config.num_res_blocks)} entries but channel_mult has "
                f"{levels} levels; give one int or one entry per level"
            )
    else:
        check_int("num_res_blocks", config.num_res_blocks, 0)
    for name in ("mid_attention", "use_scale_shift_norm", "resblock_updown", "conv_resample",
                 "skip_rescale", "efficient_updown"):
        check_bool(name, getattr(config, name))
    check_int_tuple("attention_resolutions", config.attention_resolutions, 1, allow_empty=True)
    factors = level_factors(config)
    for factor in config.attention_resolutions:
        if factor not in factors:
            raise ValueError(
                f"attention_resolutions entry {factor} is not a downsampling factor of this "
                f"U-Net; allowed: {factors}"
            )
    check_probability("dropout", config.dropout, allow_one=False)
    check_int("num_heads", config.num_heads, 1)
    check_optional_int("num_head_channels", config.num_head_channels, 1)
    check_int("norm_groups", config.norm_groups, 1)
    widths = [config.model_channels * m for m in config.channel_mult]
    for width in widths:
        if width % config.norm_groups:
            raise ValueError(
                f"channel width {width} (model_channels * channel_mult) is not divisible by "
                f"norm_groups={config.norm_groups}"
            )
    attention_widths = {w for w, f in zip(widths, factors) if f in config.attention_resolutions}
    if config.mid_attention:
        attention_widths.add(widths[-1])
    divisor_name, divisor = (
        ("num_heads", config.num_heads)
        if config.num_head_channels is None
        else ("num_head_channels", config.num_head_channels)
    )
    for width in sorted(attention_widths):
        if width % divisor:
            raise ValueError(
                f"attention width {width} is not divisible by {divisor_name}={divisor}"
            )


def block_factory(
    config: Any, embed_dim: int, context_dim: int | None = None, *, norm_eps: float = 1e-5
) -> BlockFactory:
    return BlockFactory(
        embed_dim=embed_dim,
        dropout=config.dropout,
        use_scale_shift_norm=config.use_scale_shift_norm,
        norm_groups=config.norm_groups,
        skip_rescale=config.skip_rescale,
        num_heads=config.num_heads,
        num_head_channels=config.num_head_channels,
        context_dim=context_dim,
        norm_eps=norm_eps,
    )


def _downsampler(config: Any, blocks: BlockFactory, channels: int) -> nn.Module:
    if config.resblock_updown:
        return blocks.res_block(channels, channels, resample="down")
    return Downsample(channels, config.conv_resample)


def _upsampler(config: Any, blocks: BlockFactory, channels: int) -> nn.Module:
    if config.resblock_updown:
        return blocks.res_block(channels, channels, resample="up")
    return Upsample(channels, config.conv_resample)


class UNetEncoder(nn.Module):
    """Input conv + down path + middle block, returning the middle output and the skips.

    Shared by :class:`UNet` and the noisy classifier. ``skip_specs[i]`` is
    (channels, downsampling factor) of the i-th stored skip, in the order stored.
    ``mid_attention_norm`` false: the middle block's self-attention has no GroupNorm.
    ``input_skip``: keep the input conv's output as a skip even with efficient_updown (the
    U-Net's final_block reads it).
    """

    def __init__(
        self, config: Any, in_channels: int, blocks: BlockFactory, *, mid_attention_norm: bool = True,
        input_skip: bool = False,
    ):
        super().__init__()
        mult, base = config.channel_mult, config.model_channels
        attention_at = set(config.attention_resolutions)
        efficient = config.efficient_updown
        channels = base * mult[0]
        self.input_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.keeps_input_skip = not efficient or input_skip
        self.skip_specs: list[tuple[int, int]] = [(channels, 1)] if self.keeps_input_skip else []
        self.down_blocks = nn.ModuleList()
        factor = 1

        def add(layers: list[nn.Module]) -> None:
            self.down_blocks.append(ConditionedSequential(layers))
            self.skip_specs.append((channels, factor))

        for level, (m, n_blocks) in enumerate(zip(mult, res_blocks_per_level(config))):
            if efficient:
                factor *= 2
                add([_downsampler(config, blocks, channels)])
            for _ in range(n_blocks):
                layers = [blocks.res_block(channels, base * m)]
                channels = base * m
                if factor in attention_at:
                    layers += blocks.attention(channels)
                add(layers)
            if not efficient and level < len(mult) - 1:
                factor *= 2
                add([_downsampler(config, blocks, channels)])

        middle = [blocks.res_block(channels, channels)]
        if config.mid_attention:
            middle += blocks.attention(channels, norm=mid_attention_norm)
        middle.append(blocks.res_block(channels, channels))
        self.middle = ConditionedSequential(middle)
        self.out_channels = channels
        self.out_factor = factor

    def forward(self, x, emb, context=None, context_mask=None, input_residual=None):
        """``input_residual``: added to the input conv's output (a ControlNet's encoded control
        image, see `difflab.nets.controlnet`); None adds nothing."""
        h = self.input_conv(x)
        if input_residual is not None:
            h = h + input_residual
        skips = [h] if self.keeps_input_skip else []
        for block in self.down_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        return self.middle(h, emb, context, context_mask), skips


# --------------------------------------------------------------------------- U-Net

COND_HINT = (
    '"y" needs num_classes, "context"/"context_mask" need context_dim, '
    '"concat" needs concat_channels, "w" needs guidance_embedding, "aug_level" needs aug_level_embedding, '
    '"image_embed" needs image_embed_dim; '
    '"control" is always accepted'
)


class UNet(ConfigModule):
    """ADM U-Net: ``forward(x, t, cond=None) -> (B, output_channels, H, W)``."""

    config_class = UNetConfig
    config: UNetConfig

    def __init__(self, config: UNetConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        data_channels = cfg.out_channels or cfg.in_channels
        self.output_channels = data_channels * (2 if cfg.learn_sigma else 1)
        embed_dim = 4 * cfg.model_channels
        self.time_embed = TimestepEmbedding(
            cfg.model_channels, embed_dim, order=cfg.time_embedding_order, frequency_shift=cfg.time_frequency_shift
        )
        self.label_embed = (
            LabelEmbedding(cfg.num_classes, embed_dim)
            if cfg.num_classes is not None
            else None
        )
        self.context_embed = nn.Linear(cfg.context_dim, embed_dim) if cfg.pooled_context else None
        self.guidance_embed = GuidanceEmbedding(cfg.model_channels, embed_dim) if cfg.guidance_embedding else None
        self.aug_level_embed = (
            AugmentationLevelEmbedding(cfg.model_channels, embed_dim) if cfg.aug_level_embedding else None
        )
        self.image_embed_proj = nn.Linear(cfg.image_embed_dim, embed_dim) if cfg.image_embed_dim else None
        blocks = block_factory(cfg, embed_dim, cfg.context_dim, norm_eps=cfg.norm_eps)
        input_channels = cfg.in_channels + cfg.concat_channels + (2 if cfg.coordinate_channels else 0)
        self.encoder = UNetEncoder(
            cfg, input_channels, blocks, mid_attention_norm=cfg.mid_attention_norm, input_skip=cfg.final_block
        )

        attention_at = set(cfg.attention_resolutions)
        skip_channels = [c for c, _ in self.encoder.skip_specs]
        channels, factor = self.encoder.out_channels, self.encoder.out_factor
        self.up_blocks = nn.ModuleList()
        levels = list(enumerate(zip(cfg.channel_mult, res_blocks_per_level(cfg))))
        for level, (m, n_blocks) in reversed(levels):
            for i in range(n_blocks + 1):
                layers = [blocks.res_block(channels + skip_channels.pop(), cfg.model_channels * m)]
                channels = cfg.model_channels * m
                if factor in attention_at:
                    layers += blocks.attention(channels)
                if i == n_blocks and (cfg.efficient_updown or level > 0):
                    layers.append(_upsampler(cfg, blocks, channels))
                    factor //= 2
                self.up_blocks.append(ConditionedSequential(layers))
        if cfg.final_block:  # on the input conv's skip, at full resolution
            self.up_blocks.append(ConditionedSequential([blocks.res_block(channels + skip_channels.pop(), channels)]))
        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps),
            nn.SiLU(),
            zero_module(nn.Conv2d(channels, self.output_channels, 3, padding=1)),
        )

    # ----------------------------------------------------------------- introspection

    @property
    def size_divisor(self) -> int:
        """H and W must be multiples of this (the deepest downsampling factor)."""
        return self.encoder.out_factor

    @property
    def accepted_cond(self) -> tuple[str, ...]:
        cfg = self.config
        keys = []
        if cfg.num_classes is not None:
            keys.append("y")
        if cfg.context_dim is not None:
            keys += ["context", "context_mask"]
        if cfg.concat_channels:
            keys.append("concat")
        if cfg.guidance_embedding:
            keys.append("w")
        if cfg.aug_level_embedding:
            keys.append("aug_level")
        if cfg.image_embed_dim:
            keys.append("image_embed")
        return (*keys, "control")

    def control_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(C, H, W) of each ``cond["control"]`` residual for an input of this size.

        One entry per stored skip, in the order the down path stores them (input conv
        first unless efficient_updown, then every down-path block), then one last entry
        for the middle block output. The same list is what a ControlNet must return.
        """
        self._check_size(height, width)
        specs = [*self.encoder.skip_specs, (self.encoder.out_channels, self.encoder.out_factor)]
        return [(c, height // f, width // f) for c, f in specs]

    def _check_size(self, height: int, width: int) -> None:
        d = self.size_divisor
        if height % d or width % d:
            raise ValueError(f"UNet input H and W must be multiples of {d}, got {height}x{width}")

    # ----------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, t: Any, cond: dict | None = None) -> torch.Tensor:
        cond = check_cond(cond, self.accepted_cond, "UNet", COND_HINT)
        h, emb, context, context_mask = self.prepare_inputs(x, t, cond)
        h, skips = self.encoder(h, emb, context, context_mask)
        if "control" in cond:
            control = self._check_control(cond["control"], x)
            skips = [s + c for s, c in zip(skips, control[:-1])]
            h = h + control[-1]
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)

    def prepare_inputs(
        self, x: torch.Tensor, t: Any, cond: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(encoder input, emb, context, context_mask) of an already checked ``cond``: x with its
        concatenated and coordinate channels, and the time/label/guidance/pooled-context embedding.
        Shared with a ControlNet's trainable copy, so both read the condition the same way."""
        cfg = self.config
        check_image(x, cfg.in_channels, "UNet")
        self._check_size(x.shape[2], x.shape[3])
        batch = x.shape[0]
        emb = self.time_embed(prepare_timesteps(t, batch, x.device))
        if self.label_embed is not None:
            y = require_cond(cond, "y", "UNet", f"num_classes={cfg.num_classes}")
            emb = emb + self.label_embed(y, batch)
        if self.guidance_embed is not None:
            w = require_cond(cond, "w", "UNet", "guidance_embedding=true")
            emb = emb + self.guidance_embed(prepare_timesteps(w, batch, x.device))
        if self.aug_level_embed is not None:
            s = require_cond(cond, "aug_level", "UNet", "aug_level_embedding=true")
            emb = emb + self.aug_level_embed(check_aug_level(prepare_timesteps(s, batch, x.device)))
        if self.image_embed_proj is not None:
            e = require_cond(cond, "image_embed", "UNet", f"image_embed_dim={cfg.image_embed_dim}")
            if not isinstance(e, torch.Tensor) or tuple(e.shape) != (batch, cfg.image_embed_dim):
                got = getattr(e, "shape", e)
                raise ValueError(f'cond["image_embed"] must be ({batch}, {cfg.image_embed_dim}), got {got}')
            emb = emb + self.image_embed_proj(e.to(emb.dtype))
        context, context_mask = None, None
        if cfg.context_dim is not None:
            context = require_cond(cond, "context", "UNet", f"context_dim={cfg.context_dim}")
            context_mask = cond.get("context_mask")
            check_context(context, context_mask, batch, cfg.context_dim)
            if self.context_embed is not None:
                emb = emb + self.context_embed(masked_mean(context, context_mask))
        h = x
        if cfg.concat_channels:
            extra = require_cond(cond, "concat", "UNet", f"concat_channels={cfg.concat_channels}")
            expected = (batch, cfg.concat_channels, *x.shape[2:])
            if not isinstance(extra, torch.Tensor) or tuple(extra.shape) != expected:
                got = tuple(extra.shape) if isinstance(extra, torch.Tensor) else type(extra)
                raise ValueError(f'cond["concat"] must have shape {expected}, got {got}')
            h = torch.cat([x, extra.to(x.dtype)], dim=1)
        if cfg.coordinate_channels:
            h = torch.cat([h, coordinate_maps(x)], dim=1)
        return h, emb, context, context_mask

    def _check_control(self, control: Any, x: torch.Tensor) -> list[torch.Tensor]:
        shapes = self.control_shapes(x.shape[2], x.shape[3])
        if not isinstance(control, list | tuple) or len(control) != len(shapes):
            got = len(control) if isinstance(control, list | tuple) else type(control).__name__
            raise ValueError(
                f'cond["control"] must be a list of {len(shapes)} tensors (see '
                f"UNet.control_shapes), got {got}"
            )
        for i, (tensor, shape) in enumerate(zip(control, shapes)):
            expected = (x.shape[0], *shape)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
                raise ValueError(f'cond["control"][{i}] must have shape {expected}, got {got}')
        return list(control)


def check_aug_level(s: torch.Tensor) -> torch.Tensor:
    """cond["aug_level"] must be finite levels in [0, 1] (0 = a clean low-resolution condition)."""
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or bool((s > 1).any()):
        raise ValueError(f'cond["aug_level"] must lie in [0, 1] (0 = clean condition), got {s.tolist()}')
    return s


def coordinate_maps(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): each pixel centre's x (channel 0) and y (channel 1) in [-1, 1]."""
    batch, _, height, width = x.shape
    ys = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(batch, 2, height, width)


def masked_mean(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D) -> (B, D): the mean over real tokens (padding may hold anything; a row
    without real tokens gives 0)."""
    if mask is None:
        return context.mean(dim=1)
    kept = context.masked_fill(~mask[..., None], 0.0).sum(dim=1)
    return kept / mask.sum(dim=1, keepdim=True).clamp(min=1).to(context.dtype)


def check_context(context: Any, mask: Any, batch: int, context_dim: int) -> None:
    is_tensor = isinstance(context, torch.Tensor)
    if not is_tensor or context.dim() != 3 or not context.is_floating_point():
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f'cond["context"] must be a float (B, L, D) tensor, got {got}')
    if context.shape[0] != batch or context.shape[2] != context_dim:
        raise ValueError(
            f'cond["context"] must have shape ({batch}, L, {context_dim}), '
            f"got {tuple(context.shape)}"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f'cond["context_mask"] must be a bool tensor, got {got}')
        if tuple(mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f'cond["context_mask"] must have shape {tuple(context.shape[:2])}, '
                f"got {tuple(mask.shape)}"
            )
