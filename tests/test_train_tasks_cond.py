"""Conditional training tasks: class dropout for CFG, text-to-image, the noisy classifier for
classifier guidance, the shapes attribute classifier, and the recipes that train them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from difflab.data import get_dataset
from difflab.denoiser import ClipDenoiser
from difflab.guidance import ClassifierFreeGuidance, conditioned, encode_prompts
from difflab.nets import AttributeClassifier, NoisyClassifier
from difflab.samplers import sample
from difflab.train import Config, load_config, load_pipeline, run
from difflab.train.batches import build_dataset
from difflab.train.tasks import (
    DataInfo,
    DiffusionTask,
    NoisyClassifierTask,
    build_task,
    load_classifier,
)
from test_train_support import tiny_config

RECIPES = Path(__file__).resolve().parent.parent / "configs"
TINY_UNET = dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], num_heads=2,
                 norm_groups=4)  # fmt: skip
TRAIN = {"steps": 2, "batch_size": 8, "log_every": 1, "sample_every": 2, "checkpoint_every": 0, "device": "cpu"}


def config(task: str, data: dict, model: dict, **sections) -> Config:
    raw = {"task": task, "data": data, "model": model, "diffusion": {"schedule": "linear", "T": 100},
           "train": {**TRAIN, **sections.pop("train", {})},
           "sample": {"sampler": "ddim", "steps": 2, "n": 4, **sections.pop("sample", {})}}  # fmt: skip
    return Config.from_dict(raw)


# ---------------------------------------------------------------- class-conditional diffusion
def test_class_dropout_replaces_labels_by_the_null_label_at_the_configured_rate():
    p = 0.2
    model = {"class": "UNet", "in_channels": 1, "num_classes": 10, "class_dropout_prob": p, **TINY_UNET}
    cfg = tiny_config(model=model)
    task = DiffusionTask(cfg, DataInfo((1, 8, 8), 10))
    seen = []
    task.model.label_embed.embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    n = 2000
    batch = {"x": torch.zeros(n, 1, 8, 8), "y": torch.arange(n) % 10}
    task.model.train()
    with torch.no_grad():
        task.loss(task.model, batch, torch.Generator().manual_seed(0))
        labels = seen[-1]
        null = labels == 10
        # binomial(2000, 0.2): sd 17.9; 4.5 sd either side; the other labels pass through unchanged
        assert abs(int(null.sum()) - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))
        assert torch.equal(labels[~null], batch["y"][~null])
        task.loss(task.model, batch, torch.Generator().manual_seed(0))
        assert torch.equal(seen[-1], labels)  # the mask comes from the step's generator alone
        task.loss(task.model, batch, torch.Generator().manual_seed(1))
        assert not torch.equal(seen[-1], labels)
        task.model(batch["x"], torch.zeros(n), {"y": batch["y"]})
    assert torch.equal(seen[-1], batch["y"])  # the network itself never drops, in training mode neither


def test_class_conditional_sample_grid_uses_cfg_when_sample_guidance_is_set():
    model = {"class": "UNet", "in_channels": 1, "num_classes": 10, "class_dropout_prob": 0.1, **TINY_UNET}
    task = DiffusionTask(tiny_config(model=model, sample={"guidance": 2.0, "steps": 2}), DataInfo((1, 8, 8), 10))
    denoiser, cond = task.grid_condition(task.denoiser(task.model), 4, "cpu")
    # images: the guided x0 is clipped outermost (sample.thresholding = auto -> static)
    assert isinstance(denoiser, ClipDenoiser) and task.metadata()["thresholding"] == "static"
    guided = denoiser.inner
    assert isinstance(guided, ClassifierFreeGuidance) and guided.scale == 2.0 and cond["y"].tolist() == [0, 1, 2, 3]
    images = task.sample_images(task.model.eval(), 4, torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    assert task.metadata()["sample"]["guidance"] == 2.0


# ---------------------------------------------------------------- text-to-image
TEXT_MODEL = {
    "class": "TextConditionalUNet",
    "caption_dropout_prob": 0.1,
    "unet": {"in_channels": 3, **TINY_UNET},
    "text_encoder": {"dim": 16, "depth": 1, "num_heads": 2},
}


def test_text_diffusion_trains_exports_and_samples_with_guidance(tmp_path):
    cfg = config("text_diffusion", {"name": "shapes", "size": 16, "n": 64}, TEXT_MODEL, sample={"guidance": 2.0})
    run_dir = run(cfg, tmp_path / "run")
    assert (run_dir / "samples" / "step-0000002.png").is_file()  # the grid ran with CFG on data captions
    denoiser, meta = load_pipeline(run_dir)
    assert meta["conditioning"] == "text" and meta["null_caption"] == ""
    assert any(k.startswith("text_encoder.") for k in denoiser.net.state_dict())  # trained jointly, saved together
    # two Adam steps leave the zero-initialised tensors (cross-attention outputs among them) at ~1e-4, so
    # every caption gives the same eps to 1e-7: randomise them to see what guidance does to the loaded model
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in denoiser.net.parameters():
            if param.abs().max() < 1e-3:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    prompt, negative, w = "a big blue square at the middle centre", "a red circle", 3.0
    guided, cond = conditioned(denoiser, meta, 3, scale=w, prompt=prompt, negative_prompt=negative)
    assert cond["context"].shape[:2] == cond["context_mask"].shape == (3, 8)
    # the guided x0 is (w + 1) x0(prompt) - w x0(negative prompt) of the loaded network, then clipped
    x_t, t = 0.3 * torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.full((3,), 30)
    with torch.no_grad():
        x0_c = denoiser(x_t, t, cond).x0
        x0_neg = denoiser(x_t, t, encode_prompts(denoiser, [negative] * 3)).x0
        x0_null = denoiser(x_t, t, encode_prompts(denoiser, [""] * 3)).x0
        got = guided(x_t, t, cond).x0
    torch.testing.assert_close(got, (x0_c + w * (x0_c - x0_neg)).clamp(-1, 1), rtol=1e-5, atol=1e-5)
    # negative control: guiding away from the empty caption instead of the negative prompt is another result
    assert (got - (x0_c + w * (x0_c - x0_null)).clamp(-1, 1)).abs().max() > 1e-2
    x = sample(guided, (3, 3, 16, 16), "ddim", 2, cond=cond, progress=False, generator=torch.Generator().manual_seed(0))
    plain, _ = conditioned(denoiser, meta, 3, scale=0.0, prompt=prompt)
    unguided = sample(plain, (3, 3, 16, 16), "ddim", 2, cond=cond, progress=False,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    assert (x - unguided).abs().max() > 1e-2  # the same seed: guidance changed the samples
    with pytest.raises(ValueError, match="give a prompt"):
        conditioned(denoiser, meta, 3, scale=3.0)


def test_text_diffusion_rejects_the_wrong_model_or_uncaptioned_data():
    unet = {"class": "UNet", "in_channels": 3, **TINY_UNET}
    with pytest.raises(ValueError, match="TextConditionalUNet"):
        build_task(config("text_diffusion", {}, unet), DataInfo((3, 16, 16), None, ("a red circle",)))
    with pytest.raises(ValueError, match="caption"):
        build_task(config("text_diffusion", {}, TEXT_MODEL), DataInfo((3, 16, 16), 18, None))


def test_data_info_reads_captions_of_captioned_data_only():
    assert DataInfo.of(get_dataset("digits", size=8)).captions is None
    shapes = get_dataset("shapes", size=16, n=10)
    assert DataInfo.of(shapes).captions == tuple(shapes[i]["caption"] for i in range(10))


# ---------------------------------------------------------------- noisy classifier
NOISY = {"class": "NoisyClassifier", "image_size": 8, "in_channels": 1, "num_classes": 2, **TINY_UNET}


def test_noisy_classifier_loss_decreases_on_a_trivial_problem():
    """Class 0 = dark images, class 1 = bright ones, under noise of every level; the loss must fall
    well below its start (ln 2 for a fair guess) within 40 Adam steps."""
    task = NoisyClassifierTask(config("noisy_classifier", {}, NOISY), DataInfo((1, 8, 8), 2))
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        y = torch.randint(0, 2, (n,), generator=gen)
        return {"x": (y.float() * 2 - 1).view(n, 1, 1, 1).expand(n, 1, 8, 8) * 0.8, "y": y}

    held_out = batch(512)

    def held_out_loss():
        with torch.no_grad():
            return task.loss(task.model.eval(), held_out, torch.Generator().manual_seed(1))[0].mean().item()

    before = held_out_loss()
    optimizer = torch.optim.Adam(task.model.parameters(), lr=3e-3)
    task.model.train()
    for step in range(40):
        losses, logs = task.loss(task.model, batch(32), torch.Generator().manual_seed(100 + step))
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    after = held_out_loss()
    assert set(logs) == {"accuracy"}
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert before > 0.5 and after < 0.6 * before, (before, after)


def test_noisy_classifier_task_exports_what_guidance_needs(tmp_path):
    cfg = config("noisy_classifier", {"name": "digits", "size": 8}, {**NOISY, "num_classes": 10})
    run_dir = run(cfg, tmp_path / "run")
    classifier, meta = load_classifier(run_dir)
    assert isinstance(classifier, NoisyClassifier) and not classifier.training
    assert (meta["kind"], meta["schedule"], meta["T"], meta["num_classes"]) == ("noisy", "linear", 100, 10)
    assert classifier(torch.zeros(2, 1, 8, 8), torch.tensor([3.0, 50.0])).shape == (2, 10)
    with pytest.raises(ValueError, match="num_classes is 2"):
        NoisyClassifierTask(config("noisy_classifier", {}, NOISY), DataInfo((1, 8, 8), 10))


# ---------------------------------------------------------------- attribute classifier
ATTRS = {"class": "AttributeClassifier", "image_size": 16, "channels": [8, 8], "feature_dim": 16}


def test_attribute_classifier_task_scores_every_head_and_needs_single_objects(tmp_path):
    run_dir = run(config("attribute_classifier", {"name": "shapes", "size": 16, "n": 64}, ATTRS), tmp_path / "run")
    classifier, meta = load_classifier(run_dir)
    assert isinstance(classifier, AttributeClassifier) and meta["attributes"] == ["shape", "colour", "size", "position"]
    task = build_task(config("attribute_classifier", {}, ATTRS), DataInfo((3, 16, 16), 18))
    data = get_dataset("shapes", size=16, n=8)
    losses, logs = task.loss(task.model, default_collate([data[i] for i in range(8)]), torch.Generator())
    assert losses.shape == (8,) and (losses > 0).all()
    assert set(logs) == {"acc_shape", "acc_colour", "acc_size", "acc_position", "acc_all"}
    out = classifier(torch.zeros(2, 3, 16, 16))
    assert {k: v.shape[1] for k, v in out.items()} == {"shape": 3, "colour": 6, "size": 2, "position": 9}
    two = get_dataset("shapes", size=16, n=4, two_objects=True)
    with pytest.raises(ValueError, match="single-object"):
        task.loss(task.model, default_collate([two[i] for i in range(4)]), torch.Generator())


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", ["digits-cfg", "digits-noisy-classifier", "shapes-text", "shapes-attributes"])
def test_recipe_loads_and_builds_its_task(name):
    cfg = load_config(RECIPES / f"{name}.toml")
    data = dict(cfg.data)
    if data["name"] == "shapes":
        data["n"] = 64  # the task sees the same items; only the length differs
    task = build_task(cfg, DataInfo.of(build_dataset(data)))
    assert sum(p.numel() for p in task.model.parameters()) < 3_000_000
