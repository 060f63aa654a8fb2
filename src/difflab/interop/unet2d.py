"""difflab `UNet` <-> diffusers `UNet2DModel`: configs and weights, mapped exactly.

The two are the same ADM-style network once a few details are named: diffusers' down block i
is difflab's level i (its resnets, their attentions if it is an Attn block, then its
downsampler), its up block u is level L-1-u (one resnet more, then the upsampler), its mid
block is difflab's middle. What differs only in layout is converted (q, k, v are one fused
linear in difflab); what differs in behaviour is a `UNetConfig` option (`norm_eps`, the time
features' order and frequency shift, the mid attention's GroupNorm). The family mapped:

- down/up block types DownBlock2D/AttnDownBlock2D with UpBlock2D/AttnUpBlock2D (conv
  resampling) or ResnetDownsampleBlock2D/AttnDownBlock2D/ResnetUpsampleBlock2D/AttnUpBlock2D
  with downsample_type/upsample_type "resnet" (difflab's resblock_updown), the up path
  mirroring the down path;
- block_out_channels multiples of the first (difflab's model_channels * channel_mult),
  one layers_per_block, attention_head_dim None (one head) or one width per head;
- positional time embedding (any flip_sin_to_cos, freq_shift), resnet_time_scale_shift
  "default" or "scale_shift", any norm_num_groups and norm_eps, dropout, SiLU;
- class labels through num_class_embeds (difflab's LabelEmbedding, whose last row is its
  null label).

Everything else (Fourier or learned time embeddings, skip blocks, output scale factors,
centred inputs, other activations or mid blocks) is refused with the option's name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.nets.unet import UNet, UNetConfig, res_blocks_per_level

UNET_CLASS = "UNet2DModel"
ATTENTION_DOWN, ATTENTION_UP = "AttnDownBlock2D", "AttnUpBlock2D"
PLAIN_DOWN = {"conv": "DownBlock2D", "resnet": "ResnetDownsampleBlock2D"}
PLAIN_UP = {"conv": "UpBlock2D", "resnet": "ResnetUpsampleBlock2D"}
ACTIVATIONS = ("silu", "swish")
# UNet2DModel options whose value must be this one (or, for time_embedding_dim, None)
FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "class_embed_type": None,
}
MAPPED = {
    "sample_size", "in_channels", "out_channels", "freq_shift", "flip_sin_to_cos", "down_block_types",
    "up_block_types", "block_out_channels", "layers_per_block", "downsample_type", "upsample_type", "dropout",
    "act_fn", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
    "resnet_time_scale_shift", "add_attention", "num_class_embeds", "num_train_timesteps", "time_embedding_dim",
}  # fmt: skip
RESNET_KEYS = {"in_norm": "norm1", "in_conv": "conv1", "emb_proj": "time_emb_proj", "out_norm": "norm2",
               "out_conv": "conv2", "skip": "conv_shortcut"}  # fmt: skip


class UnsupportedOption(ValueError):
    """A setting one side has and the other cannot express; the message names it."""


def _refuse(side: str, name: str, value, allowed: str) -> UnsupportedOption:
    return UnsupportedOption(f"{side} option {name} = {value!r} cannot be mapped; allowed: {allowed}")


# --------------------------------------------------------------------------- configs


def to_diffusers_config(config: UNetConfig, sample_size: tuple[int, int]) -> dict:
    """The UNet2DModel config of a difflab U-Net (`sample_size`: its H, W), or a clear refusal."""
    c = config
    side = "difflab UNet"
    unsupported = {
        "efficient_updown": (c.efficient_updown, "false"),
        "skip_rescale": (c.skip_rescale, "false (diffusers' sqrt(2) blocks are its NCSN++ skip blocks)"),
        "learn_sigma": (c.learn_sigma, "false"),
        "context_dim": (c.context_dim, "null (text models need UNet2DConditionModel, not mapped yet)"),
        "pooled_context": (c.pooled_context, "false"),
        "coordinate_channels": (c.coordinate_channels, "false"),
        "concat_channels": (c.concat_channels, "0"),
        "guidance_embedding": (getattr(c, "guidance_embedding", False), "false"),
        "aug_level_embedding": (getattr(c, "aug_level_embedding", False), "false"),
        "image_embed_dim": (getattr(c, "image_embed_dim", None), "null (unCLIP decoders are not mapped)"),
    }
    for name, (value, allowed) in unsupported.items():
        if value not in (False, None, 0):
            raise _refuse(side, name, value, allowed)
    if c.channel_mult[0] != 1:
        raise _refuse(side, "channel_mult", list(c.channel_mult), "a first entry of 1 (diffusers' time features "
                      "are as wide as the first level)")  # fmt: skip
    blocks = set(res_blocks_per_level(c))
    if len(blocks) != 1:
        raise _refuse(side, "num_res_blocks", list(c.num_res_blocks), "one count for every level")
    if not c.conv_resample and not c.resblock_updown:
        raise _refuse(side, "conv_resample", False, "true, or resblock_updown = true")
    if not c.mid_attention_norm and not c.use_scale_shift_norm:
        raise _refuse(side, "mid_attention_norm", False, "true unless use_scale_shift_norm")
    levels = len(c.channel_mult)
    attention = [2**level in c.attention_resolutions for level in range(levels)]
    widths = [c.model_channels * m for m in c.channel_mult]
    kind = "resnet" if c.resblock_updown else "conv"
    down = [ATTENTION_DOWN if a else PLAIN_DOWN[kind] for a in attention]
    up = [ATTENTION_UP if a else PLAIN_UP[kind] for a in reversed(attention)]
    return {
        "_class_name": UNET_CLASS,
        "sample_size": sample_size[0] if sample_size[0] == sample_size[1] else list(sample_size),
        "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": _plain_number(c.time_frequency_shift),
        "flip_sin_to_cos": c.time_embedding_order == "cos_sin",
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": up,
        "block_out_channels": widths,
        "layers_per_block": blocks.pop(),
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": kind,
        "upsample_type": kind,
        "dropout": c.dropout,
        "act_fn": "silu",
        "attention_head_dim": _head_dim(c, attention_widths(widths, attention, c.mid_attention)),
        "norm_num_groups": c.norm_groups,
        "attn_norm_num_groups": c.norm_groups if c.mid_attention_norm else None,
        "norm_eps": c.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if c.use_scale_shift_norm else "default",
        "add_attention": c.mid_attention,
        "class_embed_type": None,
        "num_class_embeds": None if c.num_classes is None else c.num_classes + 1,
    }


def attention_widths(widths: list[int], attention: list[bool], mid_attention: bool) -> list[int]:
    """The widths of the levels with attention, and the middle's if it attends."""
    return [w for w, a in zip(widths, attention) if a] + ([widths[-1]] if mid_attention else [])


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _head_dim(config: UNetConfig, attention_widths: list[int]) -> int | None:
    """diffusers' attention_head_dim: one width per head everywhere (difflab's num_head_channels),
    or, with num_heads, the one width all attention layers then share."""
    if config.num_head_channels is not None:
        return config.num_head_channels
    dims = {w // config.num_heads for w in attention_widths}
    if len(dims) > 1:
        raise _refuse("difflab UNet", "num_heads", config.num_heads, "num_head_channels, or num_heads with one "
                      "attention width (diffusers fixes the width of a head, not their count)")  # fmt: skip
    return dims.pop() if dims else config.model_channels


def from_diffusers_config(config: dict) -> tuple[dict, tuple[int, int], int | None]:
    """(UNetConfig fields, sample (H, W), num_class_embeds) of a UNet2DModel config, or a refusal
    naming the first option that does not map."""
    side = UNET_CLASS
    if config.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise UnsupportedOption(
            f"diffusers model class {config.get('_class_name')!r} cannot be imported; allowed: {UNET_CLASS}"
        )
    unknown = sorted(k for k in config if not k.startswith("_") and k not in MAPPED and k not in FIXED)
    if unknown:
        known = sorted(MAPPED | set(FIXED))
        raise UnsupportedOption(f"{side} option(s) {unknown} are not known to difflab; it maps {known}")
    for name, value in FIXED.items():
        if name in config and config[name] != value:
            raise _refuse(side, name, config[name], repr(value))
    get = config.get
    if get("act_fn", "silu") not in ACTIVATIONS:
        raise _refuse(side, "act_fn", get("act_fn"), "silu")
    widths = list(get("block_out_channels", (224, 448, 672, 896)))
    base = widths[0]
    if any(w % base for w in widths):
        raise _refuse(side, "block_out_channels", widths, "multiples of the first entry")
    if get("time_embedding_dim") not in (None, 4 * base):
        raise _refuse(side, "time_embedding_dim", get("time_embedding_dim"), f"null or {4 * base}")
    shift = get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise _refuse(side, "resnet_time_scale_shift", shift, "default, scale_shift")
    groups = get("norm_num_groups", 32)
    attn_groups = get("attn_norm_num_groups")
    if attn_groups not in (None, groups):
        raise _refuse(side, "attn_norm_num_groups", attn_groups, f"null or norm_num_groups ({groups})")
    down = list(get("down_block_types", ()))
    up = list(get("up_block_types", ()))
    attention, resample = _levels(down, up, get("downsample_type", "conv"), get("upsample_type", "conv"))
    sample_size = get("sample_size")
    if sample_size is None:
        raise _refuse(side, "sample_size", None, "an int or [H, W] (difflab needs the sample shape)")
    size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    head_dim = get("attention_head_dim", 8)
    fields = {
        "in_channels": get("in_channels", 3),
        "out_channels": get("out_channels", 3),
        "model_channels": base,
        "channel_mult": [w // base for w in widths],
        "num_res_blocks": get("layers_per_block", 2),
        "attention_resolutions": [2**level for level, a in enumerate(attention) if a],
        "mid_attention": bool(get("add_attention", True)),
        "dropout": get("dropout", 0.0),
        "num_heads": 1,
        "num_head_channels": head_dim,
        "use_scale_shift_norm": shift == "scale_shift",
        "resblock_updown": resample == "resnet",
        "conv_resample": True,
        "norm_groups": groups,
        "norm_eps": get("norm_eps", 1e-5),
        "time_embedding_order": "cos_sin" if get("flip_sin_to_cos", True) else "sin_cos",
        "time_frequency_shift": get("freq_shift", 0),
        "mid_attention_norm": shift == "default" or attn_groups is not None,
    }
    if head_dim is None:  # one head as wide as the layer
        fields.update(num_heads=1, num_head_channels=None)
    else:
        attending = attention_widths(widths, attention, fields["mid_attention"])
        if any(w % head_dim for w in attending):
            raise _refuse(side, "attention_head_dim", head_dim, f"a divisor of every attention width {attending}")
    return fields, size, get("num_class_embeds")


def _levels(down: list[str], up: list[str], down_type: str, up_type: str) -> tuple[list[bool], str]:
    """Per level: whether it attends, and the one resampling kind ("conv" or "resnet") of the net."""
    side = UNET_CLASS
    known_down = {ATTENTION_DOWN, *PLAIN_DOWN.values()}
    known_up = {ATTENTION_UP, *PLAIN_UP.values()}
    for name, types, known in (("down_block_types", down, known_down), ("up_block_types", up, known_up)):
        bad = [t for t in types if t not in known]
        if bad or not types:
            raise _refuse(side, name, types, ", ".join(sorted(known)))
    if len(down) != len(up):
        raise _refuse(side, "up_block_types", up, f"as many as down_block_types ({len(down)})")
    attention = [t == ATTENTION_DOWN for t in down]
    if [t == ATTENTION_UP for t in reversed(up)] != attention:
        raise _refuse(side, "up_block_types", up, "the down path mirrored (attention at the same levels)")
    for name, value in (("downsample_type", down_type), ("upsample_type", up_type)):
        if value not in ("conv", "resnet"):
            raise _refuse(side, name, value, "conv, resnet")
    # what each level really resamples with: plain blocks fix it by their type, Attn blocks by the *_type option
    kinds = {("resnet" if t == PLAIN_DOWN["resnet"] else "conv") if t != ATTENTION_DOWN else down_type
             for t in down[:-1]}  # fmt: skip
    kinds |= {("resnet" if t == PLAIN_UP["resnet"] else "conv") if t != ATTENTION_UP else up_type for t in up[:-1]}
    if len(kinds) > 1:
        raise _refuse(side, "down_block_types/up_block_types", [*down, *up],
                      "one resampling kind for every level: conv (DownBlock2D, UpBlock2D) or resnet "
                      "(ResnetDownsampleBlock2D, ResnetUpsampleBlock2D, Attn* blocks with *_type resnet)")  # fmt: skip
    return attention, kinds.pop() if kinds else "conv"


# --------------------------------------------------------------------------- weights


def module_pairs(config: UNetConfig) -> list[tuple[str, str, str]]:
    """(difflab prefix, diffusers prefix, kind) of every mapped module; kind "plain" (same
    tensor names), "resnet" or "attention"."""
    levels = len(config.channel_mult)
    blocks = res_blocks_per_level(config)[0]
    attention = [2**level in config.attention_resolutions for level in range(levels)]
    sampler = "resnet" if config.resblock_updown else "plain"
    pairs = [
        ("time_embed.mlp.0", "time_embedding.linear_1", "plain"),
        ("time_embed.mlp.2", "time_embedding.linear_2", "plain"),
        ("encoder.input_conv", "conv_in", "plain"),
        ("out.0", "conv_norm_out", "plain"),
        ("out.2", "conv_out", "plain"),
    ]
    if config.num_classes is not None:
        pairs.append(("label_embed.embedding", "class_embedding", "plain"))
    k = 0
    for level in range(levels):
        for j in range(blocks):
            pairs.append((f"encoder.down_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if attention[level]:
                pairs.append((f"encoder.down_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
            k += 1
        if level < levels - 1:
            pairs.append((f"encoder.down_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", sampler))
            k += 1
    pairs.append(("encoder.middle.0", "mid_block.resnets.0", "resnet"))
    if config.mid_attention:
        pairs.append(("encoder.middle.1", "mid_block.attentions.0", "attention"))
    pairs.append((f"encoder.middle.{2 if config.mid_attention else 1}", "mid_block.resnets.1", "resnet"))
    k = 0
    for u, level in enumerate(reversed(range(levels))):
        for i in range(blocks + 1):
            pairs.append((f"up_blocks.{k}.0", f"up_blocks.{u}.resnets.{i}", "resnet"))
            index = 1
            if attention[level]:
                pairs.append((f"up_blocks.{k}.1", f"up_blocks.{u}.attentions.{i}", "attention"))
                index = 2
            if i == blocks and level > 0:
                pairs.append((f"up_blocks.{k}.{index}", f"up_blocks.{u}.upsamplers.0", sampler))
            k += 1
    return pairs


def _names(kind: str, theirs: str, suffix: str) -> str:
    """The diffusers name of our tensor `suffix` in the module mapped to `theirs` (q/k/v apart)."""
    if kind == "resnet":
        module, _, leaf = suffix.partition(".")
        return f"{theirs}.{RESNET_KEYS[module]}.{leaf}"
    if kind == "attention":
        mapping = {"norm": "group_norm", "attention.proj": "to_out.0"}
        module, leaf = suffix.rsplit(".", 1)
        return f"{theirs}.{mapping[module]}.{leaf}"
    return f"{theirs}.{suffix}"


def to_diffusers_state(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """A difflab U-Net's state dict under diffusers' names (q, k, v split out of qkv)."""
    out, used = {}, set()
    for ours, theirs, kind in module_pairs(config):
        for name in [n for n in state if n.startswith(ours + ".")]:
            suffix = name[len(ours) + 1 :]
            used.add(name)
            if kind == "attention" and suffix.startswith("attention.qkv."):
                leaf = suffix.rsplit(".", 1)[1]
                for part, tensor in zip(("to_q", "to_k", "to_v"), state[name].chunk(3, dim=0)):
                    out[f"{theirs}.{part}.{leaf}"] = tensor.contiguous()
            else:
                out[_names(kind, theirs, suffix)] = state[name]
    left = sorted(set(state) - used)
    if left:
        raise UnsupportedOption(f"difflab UNet tensors {left} have no diffusers counterpart")
    return out


def from_diffusers_state(tensors: dict[str, Tensor], config: UNetConfig, *, add_null_label: bool) -> dict[str, Tensor]:
    """diffusers tensors under difflab's names; `add_null_label` appends a zero row to the class
    embedding (a diffusers model has no null label; difflab's guidance needs one)."""
    template = _template(config)
    theirs_by_ours = {}
    for ours, theirs, kind in module_pairs(config):
        for name in [n for n in template if n.startswith(ours + ".")]:
            suffix = name[len(ours) + 1 :]
            if kind == "attention" and suffix.startswith("attention.qkv."):
                leaf = suffix.rsplit(".", 1)[1]
                theirs_by_ours[name] = [f"{theirs}.{part}.{leaf}" for part in ("to_q", "to_k", "to_v")]
            else:
                theirs_by_ours[name] = [_names(kind, theirs, suffix)]
    wanted = {t for names in theirs_by_ours.values() for t in names}
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise ValueError(f"the diffusers weights do not fit the {UNET_CLASS} config: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")  # fmt: skip
    state = {ours: torch.cat([tensors[t] for t in names]) if len(names) > 1 else tensors[names[0]]
             for ours, names in theirs_by_ours.items()}  # fmt: skip
    if add_null_label and "label_embed.embedding.weight" in state:
        weight = state["label_embed.embedding.weight"]
        state["label_embed.embedding.weight"] = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
    return state


def _template(config: UNetConfig) -> dict[str, Tensor]:
    """The tensor names and shapes of a U-Net with this config, built on the meta device."""
    with torch.device("meta"):
        return UNet(config).state_dict()
