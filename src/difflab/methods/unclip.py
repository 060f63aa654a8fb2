"""unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP
Latents"): text -> CLIP text embedding -> prior -> CLIP image embedding -> decoder -> image.

The parts that are neither a network nor a training loop live here: the conditions the prior
and the decoder take, their classifier-free guidance, the prior's best-of-two sampling, and the
operations on image embeddings (variations, interpolation, text diffs).

Classifier-free guidance of the decoder uses `ClassifierFreeGuidance`, which runs the network on
[x_t, x_t] with [cond, null]: the null branch keeps x_t and only the condition is nulled (the
mistake reported in DALLE2-pytorch issue 285 was a null branch that lost it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.guidance import NULL_CAPTION, ClassifierFreeGuidance

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_VOCABULARY = ("a", "handwritten", *DIGIT_WORDS)


def digit_captions(labels: Tensor) -> list[str]:
    """'a handwritten seven' for label 7: captions for the digits data, which has labels only."""
    return [f"a handwritten {DIGIT_WORDS[int(y)]}" for y in labels]


def batch_captions(batch: dict) -> list[str]:
    """The captions of a batch: its "caption" list, or made from digit labels "y"."""
    captions = batch.get("caption")
    if captions is not None and not isinstance(captions, str):
        return list(captions)
    if "y" in batch:
        return digit_captions(batch["y"])
    raise ValueError('a contrastive/unCLIP batch needs "caption" (a list of strings) or digit labels "y"')


# ---------------------------------------------------------------- prior


def pad_tokens(tokens: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad (B, L, D) tokens and their (B, L) mask to `length`; padding is masked out."""
    extra = length - tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {tokens.shape[1]} tokens down to {length}")
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


@torch.no_grad()
def prior_condition(clip, captions: Sequence[str], length: int | None = None) -> dict:
    """The prior's cond for `captions` from the frozen CLIP: its caption tokens, their mask and
    the text embedding (padded to `length` tokens if given)."""
    text = clip.text_tokens(list(captions))
    tokens, mask = text["tokens"], text["mask"]
    if length is not None:
        tokens, mask = pad_tokens(tokens, mask, length)
    return {"text_tokens": tokens, "text_mask": mask, "text_embed": text["embed"]}


def guided_prior(denoiser: Denoiser, clip, cond: dict, scale: float) -> Denoiser:
    """CFG for the prior: the null condition is CLIP's encoding of the empty caption, padded to
    the condition's token count so both halves fit one batch."""
    null = prior_condition(clip, [NULL_CAPTION])
    length = max(null["text_tokens"].shape[1], cond["text_tokens"].shape[1])
    if length > cond["text_tokens"].shape[1]:
        cond["text_tokens"], cond["text_mask"] = pad_tokens(cond["text_tokens"], cond["text_mask"], length)
    null["text_tokens"], null["text_mask"] = pad_tokens(null["text_tokens"], null["text_mask"], length)
    return ClassifierFreeGuidance(denoiser, scale, null)


def pick_closest(candidates: Tensor, text_embed: Tensor) -> Tensor:
    """(K, B, D) candidate image embeddings -> (B, D): for each caption the candidate with the
    highest cosine similarity to its text embedding (unCLIP samples two and keeps the better)."""
    if candidates.ndim != 3 or candidates.shape[1:] != text_embed.shape:
        raise ValueError(f"candidates must be (K, B, D) with (B, D) = {tuple(text_embed.shape)}")
    cosine = F.cosine_similarity(candidates, text_embed[None].to(candidates), dim=-1)  # (K, B)
    best = cosine.argmax(0)
    return candidates[best, torch.arange(candidates.shape[1], device=candidates.device)]


@torch.no_grad()
def sample_prior(
    denoiser: Denoiser,
    clip,
    captions: Sequence[str],
    *,
    guidance: float = 0.0,
    draws: int = 2,
    sampler: str = "ddim",
    steps: int = 50,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, D) unit CLIP image embeddings for `captions`: `draws` samples each from the prior
    (whose network holds the standardiser), mapped back to CLIP space, the closest to the text kept."""
    from difflab.samplers import sample

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    captions = list(captions)
    net = denoiser.net
    cond = prior_condition(clip, captions)
    guided = guided_prior(denoiser, clip, cond, guidance)
    device = cond["text_embed"].device
    shape = (len(captions), net.config.embed_dim)
    candidates = []
    for _ in range(draws):
        z = sample(guided, shape, sampler, steps, generator=generator, progress=False, cond=cond, device=device)
        candidates.append(F.normalize(net.standardizer.inverse(z.to(device)), dim=-1))
    return pick_closest(torch.stack(candidates), cond["text_embed"])


# ---------------------------------------------------------------- decoder


def decoder_dropout(
    image_embed: Tensor,
    captions: Sequence[str] | None,
    image_prob: float,
    caption_prob: float,
    generator: torch.Generator,
) -> tuple[Tensor, list[str] | None]:
    """Classifier-free-guidance dropout of the decoder's two conditions, per example and each
    from its own draw: the image embedding becomes zeros with probability `image_prob`, the
    caption "" with probability `caption_prob` (unCLIP: about 10% and 50%)."""
    from difflab.train.tasks.conditions import drop_mask

    drop_image = drop_mask(image_embed.shape[0], image_prob, generator).to(image_embed.device)
    image_embed = torch.where(drop_image[:, None], torch.zeros_like(image_embed), image_embed)
    if captions is None:
        return image_embed, None
    drop_caption = drop_mask(len(captions), caption_prob, generator).tolist()
    return image_embed, [NULL_CAPTION if d else c for c, d in zip(captions, drop_caption, strict=True)]


def decoder_null(image_embed_dim: int, with_caption: bool) -> dict:
    """The decoder's null condition: the zero embedding (and the empty caption)."""
    null = {"image_embed": torch.zeros(1, image_embed_dim)}
    return {**null, "caption": [NULL_CAPTION]} if with_caption else null


def guided_decoder(denoiser: Denoiser, scale: float) -> Denoiser:
    """CFG over the image embedding (and caption): eps = (w + 1) eps(x_t, c) - w eps(x_t, null)."""
    net = denoiser.net
    null = decoder_null(net.config.image_embed_dim, net.text_encoder is not None)
    return ClassifierFreeGuidance(denoiser, scale, null)


# ---------------------------------------------------------------- embedding arithmetic


def slerp(a: Tensor, b: Tensor, t: float | Tensor) -> Tensor:
    """Spherical interpolation between unit vectors a and b (t = 0 gives a, 1 gives b)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.ndim == 1:
        t = t[:, None]
    omega = torch.acos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def text_diff(image_embed: Tensor, text_a: Tensor, text_b: Tensor, amount: float | Tensor) -> Tensor:
    """unCLIP's text diff: move an image embedding towards the direction text_b - text_a
    (normalised), by slerp with weight `amount` in [0, 1]."""
    direction = F.normalize(text_b - text_a, dim=-1).expand_as(image_embed)
    return slerp(image_embed, direction, amount)
