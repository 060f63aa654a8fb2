"""The contrastive encoder: the retrieval metric on hand-built embeddings, the symmetric InfoNCE
loss, the encoder's outputs, and a tiny "contrastive" run that trains, resumes and exports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difflab.nets import CLIP
from difflab.nets.clip import clip_loss, retrieval_top1, same_caption
from difflab.train.config import Config

TINY_CLIP = {"class": "CLIP", "image_size": 16, "channels": [8, 8], "embed_dim": 8,
             "text_encoder": {"dim": 8, "depth": 0, "num_heads": 2}}  # fmt: skip


def test_retrieval_top1_on_a_hand_built_matrix():
    text = torch.eye(4)
    image = F.normalize(torch.eye(4) + 0.1 * torch.ones(4, 4), dim=1)  # image i is nearest text i
    assert retrieval_top1(text, image) == 1.0
    # negative control: the same images in another order match no caption
    assert retrieval_top1(text, image[[1, 2, 3, 0]]) == 0.0
    # one wrong out of four: caption 3 now points at image 2
    text[3] = torch.tensor([0.0, 0.0, 1.0, 0.1])
    assert retrieval_top1(text, image) == 0.75


def test_retrieval_counts_images_with_the_same_caption_as_hits():
    captions = ["a red circle", "a red circle", "a blue square"]
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[0.9, 0.1], [0.95, 0.0], [0.0, 1.0]])  # text 0's best is image 1: same caption
    assert retrieval_top1(text, image) == pytest.approx(2 / 3)
    assert retrieval_top1(text, image, same_caption(captions)) == 1.0


def test_clip_loss_is_symmetric_and_prefers_matched_pairs():
    torch.manual_seed(0)
    e = F.normalize(torch.randn(6, 8), dim=1)
    scale = torch.tensor(10.0)
    matched = clip_loss(e, e, scale)
    shuffled = clip_loss(e, e[[1, 2, 3, 4, 5, 0]], scale)
    assert matched.shape == (6,) and matched.mean() < shuffled.mean()
    other = F.normalize(torch.randn(6, 8), dim=1)
    # swapping the roles of images and texts gives the same per-example mean
    assert torch.allclose(clip_loss(e, other, scale).mean(), clip_loss(other, e, scale).mean(), atol=1e-6)
    # uniform logits: log B per example
    assert torch.allclose(clip_loss(e, e, torch.tensor(0.0)), torch.full((6,), torch.log(torch.tensor(6.0))))


def test_clip_loss_refuses_a_positives_matrix_without_its_diagonal():
    e = F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError, match="True diagonal"):
        clip_loss(e, e, torch.tensor(1.0), torch.zeros(3, 3, dtype=torch.bool))


def test_encoder_outputs_unit_vectors_and_a_clamped_temperature():
    net = CLIP({k: v for k, v in TINY_CLIP.items() if k != "class"})
    x = torch.randn(3, 3, 16, 16)
    img, txt, scale = net(x, ["a red circle", "a big blue square at the top left", ""])
    assert img.shape == txt.shape == (3, 8)
    assert torch.allclose(img.norm(dim=1), torch.ones(3)) and torch.allclose(txt.norm(dim=1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        net.log_logit_scale.fill_(10.0)
    assert net.logit_scale().item() == 100.0
    with pytest.raises(ValueError, match="16x16"):
        net.encode_image(torch.randn(1, 3, 8, 8))


def clip_recipe(steps: int = 4) -> Config:
    return Config.from_dict({
        "task": "contrastive",
        "data": {"name": "shapes", "size": 16, "n": 64},
        "model": TINY_CLIP,
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "log_every": 1, "sample_every": 0,
                  "checkpoint_every": 2, "ema_decay": 0.0, "seed": 0, "device": "cpu"},
    })  # fmt: skip


def test_contrastive_task_trains_resumes_and_exports_a_loadable_frozen_encoder(tmp_path):
    from difflab.train.runner import run
    from difflab.train.tasks.contrastive import load_clip

    whole = run(clip_recipe(4), tmp_path / "whole")
    half = run(clip_recipe(2), tmp_path / "half")
    run(None, half, resume=True, overrides=["train.steps=4"])
    a, b = load_clip(whole), load_clip(half / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    with pytest.raises(ValueError, match="clip.json"):
        load_clip(tmp_path)


def test_contrastive_task_captions_digits_from_their_labels(tmp_path):
    from difflab.methods.unclip import DIGIT_VOCABULARY, batch_captions
    from difflab.train.runner import run
    from difflab.train.tasks.contrastive import load_clip

    assert batch_captions({"y": torch.tensor([7, 0])}) == ["a handwritten seven", "a handwritten zero"]
    model = {"class": "CLIP", "image_size": 8, "in_channels": 1, "channels": [8], "embed_dim": 8,
             "text_encoder": {"dim": 8, "depth": 0, "num_heads": 2, "vocabulary": list(DIGIT_VOCABULARY)}}
    config = clip_recipe(2).to_dict()
    out = run(Config.from_dict({**config, "data": {"name": "digits", "size": 8}, "model": model}), tmp_path / "d")
    clip = load_clip(out)
    ids, _ = clip.text_encoder.tokenizer(["a handwritten seven"])
    assert 1 not in ids.tolist()[0]  # no <unk>: every word is in the vocabulary
