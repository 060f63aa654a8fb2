"""Building blocks shared by the U-Net, DiT and the noisy classifier.

Conventions: images are (B, C, H, W); token sequences are (B, L, D); the
conditioning vector ``emb`` is (B, E). Layers whose output feeds a residual sum
start with a zero-initialised last projection so a fresh block is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INV_SQRT2 = 1.0 / math.sqrt(2.0)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (so the residual branch it ends starts at 0)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


# --------------------------------------------------------------------------- embeddings


TIME_ORDERS = ("cos_sin", "sin_cos")


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, *, order: str = "cos_sin", frequency_shift: float = 0.0
) -> torch.Tensor:
    """Sinusoidal features of (fractional) timestep indices, as in ADM and DiT.

    Returns (B, dim) = [cos(t * f_i), sin(t * f_i)] with f_i = max_period^(-i / (dim // 2 - shift));
    ``order`` "sin_cos" puts the sines first, and with ``frequency_shift`` 1 these are the
    original DDPM features (diffusers' flip_sin_to_cos=False, freq_shift=1), so that such
    models can be imported. An odd ``dim`` gets one trailing zero column.
    """
    half = dim // 2
    if frequency_shift == 0:  # difflab's own order of operations, kept bit for bit
        exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(-math.log(max_period) * exponent)
    else:  # the order diffusers computes a shifted exponent in, so that imports match it exactly
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - frequency_shift))
    args = t.float()[:, None] * freqs[None]
    pair = (torch.cos(args), torch.sin(args)) if order == "cos_sin" else (torch.sin(args), torch.cos(args))
    embedding = torch.cat(pair, dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """t -> sinusoidal features -> 2-layer MLP; the MLP lets the net reshape the features."""

    def __init__(self, frequency_dim: int, embed_dim: int, *, order: str = "cos_sin", frequency_shift: float = 0.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.order, self.frequency_shift = order, frequency_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_dim, order=self.order, frequency_shift=self.frequency_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class GuidanceEmbedding(nn.Module):
    """The guidance scale w as a network input (Meng et al. 2023; LCM's w-embedding), so one
    distilled network serves every w: sinusoidal features of w -> 2-layer MLP, added to the
    time embedding. The last layer starts at zero, so a student copied from its teacher
    computes exactly the teacher's function until training moves it."""

    SCALE = 100.0  # spreads w in [0, ~10] over the frequencies as timesteps in [0, 1000) are

    def __init__(self, frequency_dim: int, embed_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(w * self.SCALE, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class AugmentationLevelEmbedding(GuidanceEmbedding):
    """The noise-conditioning augmentation level s in [0, 1] of a super-resolution stage (Ho et
    al. 2021): how corrupted its low-resolution condition is, so the stage knows how much to
    trust it. Same shape as `GuidanceEmbedding` (zero-initialised last layer: a stage copied
    from an unaugmented one starts out ignoring s); s is spread like a timestep in [0, 1000)."""

    SCALE = 1000.0


class LabelEmbedding(nn.Module):
    """Class label -> vector. Label ``num_classes`` is a learned "null" class for CFG.

    It never drops labels itself, in training mode neither: the training task replaces
    labels by the null label (``difflab.train.tasks.conditions``), so that two networks
    (online and target, student and teacher) can be given the same dropped labels.
    """

    def __init__(self, num_classes: int, embed_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor, batch_size: int) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.dtype not in _INT_DTYPES:
            got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f'cond["y"] must be an integer (long) tensor, got {got}')
        if y.shape != (batch_size,):
            raise ValueError(f'cond["y"] must have shape ({batch_size},), got {tuple(y.shape)}')
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(
                f'cond["y"] labels must be in [0, {self.num_classes}] ({self.num_classes} = null '
                f"label), got min {int(y.min())} max {int(y.max())}"
            )
        return self.embedding(y.long())


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# --------------------------------------------------------------------------- resampling


class Downsample(nn.Module):
    """Halve H and W: stride-2 3x3 conv (learned) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x


# --------------------------------------------------------------------------- residual block


class ResBlock(nn.Module):
    """ADM residual block conditioned on ``emb``.

    ``use_scale_shift_norm``: emb gives (scale, shift) applied after the second
    GroupNorm (adaptive group norm); otherwise emb is added before it.
    ``resample`` "up"/"down" makes it a BigGAN-style resampling block (both branches
    are resampled, parameter-free). ``skip_rescale`` divides the sum by sqrt(2) so
    activations keep their scale as blocks stack (NCSN++). ``norm_eps``: the GroupNorms'
    epsilon (torch's 1e-5 by default; diffusers' DDPM ports use 1e-6).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embed_dim: int,
        *,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resample: str | None = None,
        norm_groups: int = 32,
        skip_rescale: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.skip_rescale = skip_rescale
        self.in_norm = nn.GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_proj = nn.Linear(embed_dim, emb_out)
        self.out_norm = nn.GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(_resample(h, self.resample))
        x = _resample(x, self.resample)
        e = self.emb_proj(F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_norm(h), 1 + scale)  # norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        out = self.skip(x) + h
        return out * INV_SQRT2 if self.skip_rescale else out


# --------------------------------------------------------------------------- attention


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, dim = x.shape
    return x.view(batch, length, heads, dim // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, L, D) via scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(part, self.num_heads) for part in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention from tokens (B, L, D) to a context (B, M, D_ctx).

    ``context_mask`` (B, M) bool, True = real token. Padded tokens are zeroed before
    projection and masked out of the softmax, so they cannot change the output (even
    if they hold inf/nan). A sample with no real token gets a zero update.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        attn_mask = has_token = None
        if context_mask is not None:
            context = context.masked_fill(~context_mask[..., None], 0.0)
            has_token = context_mask.any(dim=1)
            # Samples without real tokens attend everywhere (finite) and are zeroed below.
            attn_mask = (context_mask | ~has_token[:, None])[:, None, None, :]
        q = _split_heads(self.q(x), self.num_heads)
        k, v = (_split_heads(part, self.num_heads) for part in self.kv(context).chunk(2, dim=-1))
        out = self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))
        if has_token is not None:
            out = out * has_token[:, None, None].to(out.dtype)
        return out


class SpatialSelfAttention(nn.Module):
    """Residual self-attention over all H*W positions of an image (global mixing).
    ``norm=False`` attends to the raw features (diffusers' mid-block attention with
    scale-shift res blocks has no GroupNorm)."""

    def __init__(
        self, channels: int, num_heads: int, norm_groups: int, skip_rescale: bool, *, norm_eps: float = 1e-5,
        norm: bool = True,
    ):  # fmt: skip
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = nn.GroupNorm(norm_groups, channels, eps=norm_eps) if norm else nn.Identity()
        self.attention = SelfAttention(channels, num_heads)
        zero_module(self.attention.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        h = self.attention(tokens).transpose(1, 2).reshape(batch, channels, height, width)
        return (x + h) * INV_SQRT2 if self.skip_rescale else x + h


class SpatialCrossAttention(nn.Module):
    """Residual cross-attention from every image position to a context sequence."""

    def __init__(
        self, channels: int, context_dim: int, num_heads: int, norm_groups: int, skip_rescale: bool,
        *, norm_eps: float = 1e-5,
    ):  # fmt: skip
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = nn.GroupNorm(norm_groups, channels, eps=norm_eps)
        self.attention = CrossAttention(channels, context_dim, num_heads)
        zero_module(self.attention.proj)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        h = self.attention(tokens, context, context_mask)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        return (x + h) * INV_SQRT2 if self.skip_rescale else x + h


class AttentionPool2d(nn.Module):
    """Pool (B, C, H, W) -> (B, out_dim): the spatial mean token attends to all positions.

    Used by the noisy classifier (as in ADM/CLIP); a learned position embedding lets
    the pool weigh where features are, so the input size is fixed.
    """

    def __init__(self, spatial_size: int, channels: int, num_heads: int, out_dim: int):
        super().__init__()
        self.spatial_size = spatial_size
        self.positional = nn.Parameter(
            torch.randn(spatial_size * spatial_size + 1, channels) / channels**0.5
        )
        self.attention = SelfAttention(channels, num_heads)
        self.out = nn.Linear(channels, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.positional
        return self.out(self.attention(tokens)[:, 0])


# --------------------------------------------------------------------------- containers


class ConditionedSequential(nn.ModuleList):
    """Apply layers in order, giving each the conditioning it needs (emb or context)."""

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialCrossAttention):
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h


@dataclass(frozen=True)
class BlockFactory:
    """Builds res/attention blocks with one set of shared options (keeps builders short)."""

    embed_dim: int
    dropout: float
    use_scale_shift_norm: bool
    norm_groups: int
    skip_rescale: bool
    num_heads: int
    num_head_channels: int | None
    context_dim: int | None = None
    norm_eps: float = 1e-5

    def heads(self, channels: int) -> int:
        if self.num_head_channels is None:
            return self.num_heads
        return channels // self.num_head_channels

    def res_block(self, in_channels: int, out_channels: int, resample: str | None = None):
        return ResBlock(
            in_channels,
            out_channels,
            self.embed_dim,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resample=resample,
            norm_groups=self.norm_groups,
            skip_rescale=self.skip_rescale,
            norm_eps=self.norm_eps,
        )

    def attention(self, channels: int, *, norm: bool = True) -> list[nn.Module]:
        """Self-attention (without its GroupNorm if not `norm`), followed by cross-attention
        when a context is configured."""
        heads = self.heads(channels)
        layers: list[nn.Module] = [
            SpatialSelfAttention(
                channels, heads, self.norm_groups, self.skip_rescale, norm_eps=self.norm_eps, norm=norm
            )
        ]
        if self.context_dim is not None:
            layers.append(
                SpatialCrossAttention(
                    channels, self.context_dim, heads, self.norm_groups, self.skip_rescale, norm_eps=self.norm_eps
                )
            )
        return layers
