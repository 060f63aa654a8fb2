"""Super-resolution stages (task = "super_resolution"): the low-resolution condition and its
noise-conditioning augmentation, the level s given to the network, the frozen text encoder and
its cache, and tiny training runs that resume bit for bit. Every check has a negative control:
the same check run on something that should fail it, failing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from difflab.data.digits import DigitsDataset
from difflab.data.resize import downsample, gaussian_blur, upsample
from difflab.methods.cascade import (
    draw_levels,
    level_alpha_bar,
    level_timestep,
    noised_condition,
    superres_condition,
)
from difflab.nets import build_network
from difflab.nets.text import CaptionCache, TextConditionalUNet
from difflab.nets.unet import UNet
from difflab.schedules import Schedule
from difflab.train import run
from difflab.train.checkpoint import latest_checkpoint, load_checkpoint
from difflab.train.config import Config, load_config
from difflab.train.monitor import read_log
from difflab.train.tasks import DataInfo, build_task
from test_nets_support import perturbed
from test_train_support import assert_identical, without_timing

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SR_UNET = {"class": "UNet", "in_channels": 1, "model_channels": 8, "channel_mult": [1, 1], "num_res_blocks": 1,
           "attention_resolutions": [], "mid_attention": False, "norm_groups": 4, "concat_channels": 1,
           "aug_level_embedding": True}  # fmt: skip
TRAIN = {"steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 1, "sample_every": 0, "checkpoint_every": 2,
         "ema_decay": 0.9, "seed": 0, "device": "cpu"}  # fmt: skip


def sr_config(superres: dict | None = None, model: dict | None = None, data: dict | None = None, **sections) -> Config:
    """A digits 8 -> 16 stage on a tiny U-Net (a few thousand parameters)."""
    raw = {
        "task": "super_resolution",
        "data": data or {"name": "digits", "size": 16},
        "model": model or SR_UNET,
        "diffusion": {"schedule": "cosine", "T": 100},
        "train": TRAIN,
        "sample": {"sampler": "ddim", "steps": 3, "n": 4},
        "superres": {"low_size": 8, **(superres or {})},
        **sections,
    }
    return Config.from_dict(raw)


DIGITS16 = DigitsDataset("train", size=16)


def sr_task(**options):
    return build_task(sr_config(**options), DataInfo.of(DIGITS16))


def digit_batch(n: int = 8, offset: float = 0.0) -> dict:
    return {"x": DIGITS16.images[:n] + offset, "y": DIGITS16.labels[:n]}


class Recorder(nn.Module):
    """Stands in for the network: keeps every cond it is called with and predicts zeros."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.conds: list[dict] = []

    def forward(self, x, t, cond=None):
        self.conds.append(cond)
        return x * self.weight


def recorded_condition(task, batch: dict, seed: int = 0) -> dict:
    recorder = Recorder()
    task.loss(recorder, batch, torch.Generator().manual_seed(seed))
    return recorder.conds[-1]


# ---------------------------------------------------------------- resizing and blur
def test_downsample_is_the_block_mean_and_upsampling_keeps_constants():
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    low = downsample(x, 2)
    torch.testing.assert_close(low, x.reshape(3, 2, 2, 4, 2, 4).mean((3, 5)))
    flat = torch.full((2, 1, 4, 4), 0.3, dtype=torch.float64)
    for mode in ("nearest", "bilinear", "bicubic"):
        torch.testing.assert_close(upsample(flat, 16, mode), torch.full((2, 1, 16, 16), 0.3, dtype=torch.float64))
    assert not torch.allclose(upsample(x, 16, "bicubic"), upsample(x, 16, "nearest"))  # the mode is honoured
    with pytest.raises(ValueError, match="integer multiple"):
        downsample(x, 3)
    with pytest.raises(ValueError, match="unknown upsample mode 'area'"):
        upsample(x, 16, "area")


def test_gaussian_blur_is_per_image_normalised_and_zero_sigma_is_the_identity():
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    out = gaussian_blur(x, torch.tensor([0.0, 0.5, 2.0]))
    assert torch.equal(out[0], x[0])  # sigma 0: unchanged
    assert not torch.allclose(out[1], x[1]) and out[2].std() < out[1].std() < x[1].std() * 1.01
    flat = torch.full((1, 3, 6, 6), -0.4, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(flat, 1.3), flat)  # a normalised kernel keeps a constant
    with pytest.raises(ValueError, match="sigma must be one finite number >= 0"):
        gaussian_blur(x, torch.tensor([1.0, -1.0, 1.0]))


# ---------------------------------------------------------------- the augmentation level s
def test_s_zero_gives_the_clean_condition():
    """s = 0 is the clean low-resolution image, exactly: in the math and through the task."""
    schedule = Schedule.make("cosine", 100)
    z = torch.randn(4, 1, 8, 8)
    noise = 10 * torch.randn(4, 1, 8, 8)
    assert torch.equal(noised_condition(z, 0.0, schedule, noise), z)
    assert not torch.allclose(noised_condition(z, 0.01, schedule, noise), z, atol=1e-3)  # negative control
    batch = digit_batch()
    clean = upsample(downsample(batch["x"], 8), 16, "bicubic")
    cond = recorded_condition(sr_task(superres={"aug_levels": [0.0, 0.0]}), batch)
    assert torch.equal(cond["concat"], clean) and torch.equal(cond["aug_level"], torch.zeros(8))
    noisy = recorded_condition(sr_task(superres={"aug_levels": [0.2, 0.2]}), batch)
    assert torch.equal(noisy["aug_level"], torch.full((8,), 0.2)) and (noisy["concat"] - clean).abs().mean() > 0.05
    none = recorded_condition(sr_task(superres={"augmentation": "none"}), batch)  # "none" ignores aug_levels
    assert torch.equal(none["concat"], clean) and torch.equal(none["aug_level"], torch.zeros(8))


def signal_coefficients(task, seed: int = 0, offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar) actually applied to each example's condition, the level s the network
    was given). The same draws on x and on x + offset: the noise cancels in the difference, and
    upsampling keeps a constant, so the difference is sqrt(alpha_bar(s)) * offset exactly."""
    a = recorded_condition(task, digit_batch(), seed)
    b = recorded_condition(task, digit_batch(offset=offset), seed)
    applied = (b["concat"] - a["concat"]).mean((1, 2, 3)).double() / offset
    assert torch.equal(a["aug_level"], b["aug_level"])
    return applied, a["aug_level"]


def test_the_same_level_reaches_the_noising_and_the_embedding():
    task = sr_task(superres={"aug_levels": [0.05, 0.95]})
    applied, given = signal_coefficients(task)
    expected = level_alpha_bar(task.aug_schedule, given.double()).sqrt()
    torch.testing.assert_close(applied, expected, atol=1e-5, rtol=0)
    assert (applied - expected.roll(1)).abs().max() > 0.05  # negative control: another example's level
    # and the network embeds exactly that key: a stage whose embedding is trained reads s
    net = perturbed(build_network(SR_UNET))
    x, concat = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    out = [net(x, torch.tensor([5.0, 5.0]), {"concat": concat, "aug_level": torch.full((2,), s)}) for s in (0.1, 0.6)]
    assert not torch.allclose(out[0], out[1])


def test_per_example_levels_are_honoured():
    """Training draws one level per example and noises each example at its own level; the
    truncated variant draws the steps of the base's chain; at sampling a level per example works too."""
    task = sr_task(superres={"aug_levels": [0.1, 0.7]})
    applied, given = signal_coefficients(task, seed=3)
    assert len(set(given.tolist())) == 8 and 0.1 <= given.min() and given.max() <= 0.7
    expected = level_alpha_bar(task.aug_schedule, given.double()).sqrt()
    torch.testing.assert_close(applied, expected, atol=1e-5, rtol=0)
    one = level_alpha_bar(task.aug_schedule, given.double().mean()).sqrt()  # negative control: a batch level
    assert (applied - one).abs().max() > 0.02
    levels = torch.cat([draw_levels(4000, 0.1, 0.7, torch.Generator().manual_seed(s)) for s in range(2)])
    assert abs(levels.mean().item() - 0.4) < 0.01 and abs(levels.std().item() - 0.6 / math.sqrt(12)) < 0.01
    grid = draw_levels(2000, 0.1, 0.7, torch.Generator().manual_seed(0), grid_T=50)
    steps = grid.double() * 50
    assert (steps - steps.round()).abs().max() < 1e-5 and steps.min().round() == 5 and steps.max().round() == 35
    assert torch.equal(level_timestep(grid, 50), steps.round() - 1)  # and noised at exactly those steps
    # sampling: superres_condition and noised_condition take one level per example
    schedule = Schedule.make("linear", 100)
    z, noise = torch.zeros(3, 1, 4, 4), torch.ones(3, 1, 4, 4)
    s = torch.tensor([0.0, 0.3, 0.9])
    cond = superres_condition(noised_condition(z, s, schedule, noise), s, 8, "bilinear")
    per_example = cond["concat"].mean((1, 2, 3)).double()
    torch.testing.assert_close(per_example, (1 - level_alpha_bar(schedule, s)).sqrt(), atol=1e-6, rtol=0)
    assert torch.equal(cond["aug_level"], s)


def test_a_truncated_stage_noises_on_its_base_schedule_at_its_steps(tmp_path):
    base = run(Config.from_dict({
        "task": "diffusion", "data": {"name": "digits", "size": 8},
        "model": {**{k: v for k, v in SR_UNET.items() if k not in ("concat_channels", "aug_level_embedding")}},
        "diffusion": {"schedule": "linear", "T": 40}, "train": {**TRAIN, "steps": 1},
        "sample": {"sampler": "ddim", "steps": 3, "n": 4},
    }), tmp_path / "base")  # fmt: skip
    task = sr_task(superres={"augmentation": "truncated", "base": str(base), "aug_levels": [0.1, 0.5]})
    assert task.aug_schedule.to_config() == Schedule.make("linear", 40).to_config() and task.grid_T == 40
    applied, given = signal_coefficients(task)
    assert torch.equal(level_timestep(given, 40), (given.double() * 40).round() - 1)  # steps of the base's chain
    torch.testing.assert_close(applied, level_alpha_bar(task.aug_schedule, given.double()).sqrt(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a step of the previous stage's chain"):
        sr_task(superres={"augmentation": "truncated", "base": str(base), "aug_level": 0.11})
    with pytest.raises(ValueError, match=r"draws images of shape \(1, 8, 8\); this stage refines \(1, 4, 4\)"):
        sr_task(superres={"low_size": 4, "base": str(base)})


# ---------------------------------------------------------------- the network option
def test_the_aug_level_embedding_starts_at_zero_and_checks_its_input():
    net = build_network(SR_UNET)
    assert net.aug_level_embed.mlp[2].weight.abs().sum() == 0  # a fresh stage ignores s at first
    x, t, concat = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 7.0]), torch.randn(2, 1, 16, 16)
    net = perturbed(net)
    torch.nn.init.zeros_(net.aug_level_embed.mlp[2].weight)
    torch.nn.init.zeros_(net.aug_level_embed.mlp[2].bias)
    a, b = (net(x, t, {"concat": concat, "aug_level": torch.tensor([s, s])}) for s in (0.0, 0.8))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r'needs cond\["aug_level"\] \(aug_level_embedding=true\)'):
        net(x, t, {"concat": concat})
    with pytest.raises(ValueError, match=r'cond\["aug_level"\] must lie in \[0, 1\]'):
        net(x, t, {"concat": concat, "aug_level": torch.tensor([0.5, 1.5])})
    plain = UNet({k: v for k, v in SR_UNET.items() if k != "class" and k != "aug_level_embedding"})
    with pytest.raises(ValueError, match=r"unknown cond keys \['aug_level'\]"):
        plain(x, t, {"concat": concat, "aug_level": 0.1})
    assert not hasattr(plain, "aug_level_embed") or plain.aug_level_embed is None  # off by default


# ---------------------------------------------------------------- the frozen text encoder and its cache
TEXT_UNET = {"in_channels": 3, "model_channels": 8, "channel_mult": [1, 1], "num_res_blocks": 1,
             "attention_resolutions": [2], "num_heads": 2, "norm_groups": 4, "pooled_context": True}  # fmt: skip
TEXT_ENCODER = {"class": "TextEncoder", "dim": 16, "depth": 1, "num_heads": 2, "max_length": 24}


class CountingEncoder(nn.Module):
    """Wraps an encoder's `encode` and counts the captions it is asked for."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def encode(self, captions, device=None):
        self.seen += list(captions)
        return self.inner.encode(captions, device=device)


def test_the_frozen_encoder_encodes_each_caption_once_and_matches_the_uncached_encoding():
    torch.manual_seed(0)
    model = TextConditionalUNet(unet=TEXT_UNET, text_encoder=TEXT_ENCODER, freeze_text_encoder=True, text_cache_size=3)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert all(p.requires_grad for p in model.unet.parameters())
    model.train()
    assert not model.text_encoder.training  # frozen: never in training mode (no dropout)
    counting = CountingEncoder(model.text_encoder)
    captions = ["a big red circle at the top left", "a square", "", "a big red circle at the top left"]
    cached = model.caption_cache.encode(counting, captions)
    assert counting.seen == ["a big red circle at the top left", "a square", ""]  # each once
    direct = model.text_encoder.encode(captions)
    torch.testing.assert_close(cached["context"], direct["context"], atol=1e-6, rtol=1e-6)
    assert torch.equal(cached["context_mask"], direct["context_mask"])
    model.caption_cache.encode(counting, ["a square", "a circle"])  # "a circle" pushes out the least recent, ""
    assert counting.seen[3:] == ["a circle"] and list(model.caption_cache.entries) == [
        "a big red circle at the top left", "a square", "a circle"]  # fmt: skip
    model.load_state_dict(model.state_dict())  # new weights: stale encodings must go
    assert not model.caption_cache.entries
    plain = TextConditionalUNet(unet=TEXT_UNET, text_encoder=TEXT_ENCODER)  # negative control: not frozen
    assert plain.caption_cache is None and all(p.requires_grad for p in plain.text_encoder.parameters())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0])
    model.eval()
    assert torch.equal(
        model(x, t, {"caption": captions[:2]}), model.unet(x, t, model.text_encoder.encode(captions[:2]))
    )
    with pytest.raises(ValueError, match="text_cache_size"):
        CaptionCache(0)


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    """A tiny trained text-to-image model: the frozen encoder's source."""
    folder = tmp_path_factory.mktemp("text-source")
    cfg = Config.from_dict({
        "task": "text_diffusion", "data": {"name": "shapes", "size": 16, "n": 64},
        "model": {"class": "TextConditionalUNet", "unet": TEXT_UNET, "text_encoder": TEXT_ENCODER},
        "diffusion": {"schedule": "cosine", "T": 100}, "train": {**TRAIN, "steps": 2},
        "sample": {"sampler": "ddim", "steps": 2, "n": 4},
    })  # fmt: skip
    return run(cfg, folder / "run") / "model"


def text_stage(source, **superres) -> Config:
    model = {
        "class": "TextConditionalUNet",
        "caption_dropout_prob": 0.2,
        "freeze_text_encoder": True,
        "unet": {**TEXT_UNET, "concat_channels": 3, "aug_level_embedding": True},
        "text_encoder": TEXT_ENCODER,
    }
    return sr_config(superres={"text_encoder": str(source), "blur_sigma": [0.3, 0.8], **superres}, model=model,
                     data={"name": "shapes", "size": 16, "n": 64}, sample={"sampler": "ddim", "steps": 2, "n": 4,
                                                                           "guidance": 2.0})  # fmt: skip


def test_a_text_stage_trains_and_resumes_bit_for_bit_with_its_frozen_encoder(text_source, tmp_path):
    from difflab.pipelines import Pipeline, read_manifest

    recipe = text_stage(text_source)
    whole = run(recipe, tmp_path / "whole")
    half = run(recipe, tmp_path / "half", overrides=["train.steps=2"])
    run(None, half, resume=True, overrides=["train.steps=4"])
    assert without_timing(read_log(half)) == without_timing(read_log(whole))
    a, b = (load_checkpoint(latest_checkpoint(r)) for r in (whole, half))
    assert_identical(a["model"], b["model"])
    assert_identical(a["ema"], b["ema"])
    other = run(recipe, tmp_path / "other", overrides=["train.seed=1"])  # negative control: the check can fail
    assert without_timing(read_log(other)) != without_timing(read_log(whole))
    source = Pipeline.from_pretrained(text_source, device="cpu").network.text_encoder.state_dict()
    for name, tensor in source.items():  # frozen: the encoder is exactly its source's, in the export too
        assert torch.equal(a["model"][f"text_encoder.{name}"], tensor)
        assert torch.equal(a["ema"]["weights"][f"text_encoder.{name}"], tensor)
    manifest = read_manifest(whole / "model")
    assert manifest["conditioning"] == "text" and manifest["superres"]["text_encoder"] == str(text_source)
    assert manifest["superres"]["low_size"] == 8 and manifest["superres"]["blur_sigma"] == [0.3, 0.8]
    with pytest.raises(ValueError, match="super-resolution stage"):
        Pipeline.from_pretrained(whole, device="cpu")(n=1, prompt="a circle")


def test_bad_stages_are_refused_with_clear_errors(text_source):
    from difflab.data import get_dataset

    with pytest.raises(ValueError, match="needs \\[superres\\] low_size"):
        build_task(sr_config(superres={"low_size": 0}), DataInfo.of(DIGITS16))
    with pytest.raises(ValueError, match="concat_channels = 1, got 0"):
        sr_task(model={**SR_UNET, "concat_channels": 0})
    with pytest.raises(ValueError, match="needs aug_level_embedding = true"):
        sr_task(model={**SR_UNET, "aug_level_embedding": False})
    plain = sr_task(model={**SR_UNET, "aug_level_embedding": False}, superres={"augmentation": "none"})  # fine
    assert "aug_level" not in recorded_condition(plain, digit_batch())  # the network gets no level it cannot take
    losses, _ = plain.loss(plain.model, digit_batch(), torch.Generator().manual_seed(0))
    assert losses.shape == (8,) and plain.metadata()["superres"]["aug_level_input"] is False
    with pytest.raises(ValueError, match="must divide the data's size 16"):
        sr_task(superres={"low_size": 5})
    with pytest.raises(ValueError, match="superres.base"):
        sr_config(superres={"augmentation": "truncated"})
    with pytest.raises(ValueError, match="superres.aug_level = 1.5 is not allowed"):
        sr_config(superres={"aug_levels": [0.0, 0.5], "aug_level": 1.5})
    bad = text_stage(text_source).to_dict()
    bad["model"]["freeze_text_encoder"] = False
    shapes = DataInfo.of(get_dataset("shapes", size=16, n=8))
    with pytest.raises(ValueError, match="freeze_text_encoder = true"):
        build_task(Config.from_dict(bad), shapes)
    with pytest.raises(ValueError, match="needs data whose items have a caption"):
        build_task(Config.from_dict(bad), DataInfo.of(DIGITS16))
    bad["model"].update(freeze_text_encoder=True, text_encoder={**TEXT_ENCODER, "dim": 32})
    with pytest.raises(ValueError, match="must have the settings of"):
        build_task(Config.from_dict(bad), shapes)


@pytest.mark.parametrize("recipe", ["digits-sr32.toml", "shapes-sr64.toml", "digits32-direct.toml",
                                    "shapes64-direct.toml"])  # fmt: skip
def test_the_cascade_recipes_build(recipe):
    """Each recipe builds its task on its data (bases, encoders and sizes checked), without training."""
    from difflab.train.batches import build_dataset
    from difflab.train.preflight import check_recipe

    config = load_config(CONFIGS / recipe)
    check_recipe(config)
    data = dict(config.data)
    if data["name"] == "shapes":
        data["n"] = 16  # the scenes are drawn on the fly; the recipe's length does not matter here
    task = build_task(config, DataInfo.of(build_dataset(data, "raise")))
    if config.task == "super_resolution":
        assert task.model.config is not None and task.aug_schedule is not None
