"""ControlNet: the trainable copy + zero convolutions on a locked base (`difflab.nets.controlnet`),
its training task (`task = "control"`) and the model folder that `Pipeline` samples with a
control image. Tiny 16x16 bases, a few steps each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflab.guidance import batch_conditions
from difflab.nets import ControlledUNet, ControlNet, TextConditionalUNet, UNet, load_network
from difflab.nets.controlnet import GUESS_MODE_DECAY
from difflab.pipelines import Pipeline, new_manifest, read_manifest, write_manifest
from difflab.schedules import Schedule
from difflab.train import run
from difflab.train.checkpoint import latest_checkpoint, load_checkpoint
from difflab.train.config import Config
from difflab.train.monitor import read_log
from test_train_support import assert_identical, without_timing

TINY_UNET = dict(in_channels=3, model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                 norm_groups=4, num_heads=2)  # fmt: skip


def perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """`net` with every weight moved by noise: a fresh U-Net outputs exactly 0 (zero output conv),
    which would make "the controlled model equals the base" trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def text_base(seed: int = 0) -> TextConditionalUNet:
    torch.manual_seed(seed)
    net = TextConditionalUNet(unet={**TINY_UNET, "pooled_context": True, "coordinate_channels": True},
                              text_encoder={"dim": 16, "depth": 0, "num_heads": 2})  # fmt: skip
    return perturbed(net, seed)


def class_base(seed: int = 0) -> UNet:
    """Another encoder layout: class labels, down-sampling res blocks before each level, 2 blocks."""
    torch.manual_seed(seed)
    net = UNet(**{**TINY_UNET, "num_res_blocks": [1, 2]}, num_classes=4, efficient_updown=True, resblock_updown=True)
    return perturbed(net, seed)


def inputs(base, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    t = torch.tensor([3.0, 40.0, 95.0])[:batch]
    cond = {"caption": ["a red circle", "", "a big square"][:batch]} if isinstance(base, TextConditionalUNet) else {
        "y": torch.tensor([0, 3, 4])[:batch]}  # fmt: skip
    hint = (torch.rand(batch, 1, 16, 16, generator=g) > 0.5).float()
    return x, t, cond, hint


BASES = {"text": text_base, "class": class_base}


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize("kind", BASES)
def test_at_initialisation_the_controlled_model_is_exactly_the_base(kind):
    base = BASES[kind]()
    control = ControlNet.from_base(base, hint_widths=(8, 16))
    x, t, cond, hint = inputs(base)
    with torch.no_grad():
        expected = base(x, t, cond)
        assert expected.abs().mean() > 0.01  # the base is not trivially zero
        assert torch.equal(ControlledUNet(base, control)(x, t, {**cond, "hint": hint}), expected)
        # negative control: a branch whose output convolutions do not start at zero changes the base
        control.zero_convs[0].bias.fill_(1e-4)
        assert not torch.equal(ControlledUNet(base, control)(x, t, {**cond, "hint": hint}), expected)


@pytest.mark.parametrize("kind", BASES)
def test_the_copy_starts_from_the_base_weights_and_its_residuals_fit_the_base_hook(kind):
    base = BASES[kind]()
    unet = getattr(base, "unet", base)
    control = ControlNet.from_base(base)
    copied = control.trainable_copy.state_dict()
    assert copied and all(torch.equal(v, unet.state_dict()[k]) for k, v in copied.items())
    assert not any(k.startswith(("up_blocks.", "out.")) for k in copied)  # the encoder half only
    fresh = ControlNet(unet=unet.config.to_dict())  # negative control: built, but not from the base
    assert not all(torch.equal(v, copied[k]) for k, v in fresh.trainable_copy.state_dict().items())
    x, t, cond, hint = inputs(base)
    if "caption" in cond:
        cond = base.encode(cond["caption"])
    residuals = control(x, t, cond, hint)
    assert [tuple(r.shape[1:]) for r in residuals] == unet.control_shapes(16, 16)
    assert all(r.shape[0] == 3 and not r.any() for r in residuals)  # zero at initialisation


def control_made_active(base) -> ControlNet:
    """A ControlNet whose every weight is non-zero (as after training)."""
    return perturbed(ControlNet.from_base(base, hint_widths=(8, 16)), seed=7, scale=0.1)


def test_strength_zero_is_exactly_the_base_and_guess_mode_scales_by_level():
    base = text_base()
    control = control_made_active(base)
    model = ControlledUNet(base, control)
    x, t, cond, hint = inputs(base)
    with torch.no_grad():
        plain = base(x, t, cond)
        assert torch.equal(model(x, t, {**cond, "hint": hint, "control_strength": torch.zeros(3)}), plain)
        assert not torch.equal(model(x, t, {**cond, "hint": hint}), plain)  # an active branch does change it
        mixed = model(x, t, {**cond, "hint": hint, "control_strength": torch.tensor([0.0, 1.0, 0.0])})
        assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])
        assert not torch.equal(mixed[1], plain[1])

        context = base.encode(cond["caption"])
        full, half = control(x, t, context, hint), control(x, t, context, hint, strength=0.5)
        guessed = control(x, t, context, hint, guess_mode=True)
        k = len(full)
        for i, (r, h, g) in enumerate(zip(full, half, guessed)):
            torch.testing.assert_close(h, 0.5 * r)
            torch.testing.assert_close(g, GUESS_MODE_DECAY ** (k - 1 - i) * r)  # the middle block's is unscaled
        assert torch.equal(guessed[-1], full[-1]) and not torch.equal(guessed[0], full[0])


def test_a_wrong_control_image_is_a_clear_error():
    base = text_base()
    model = ControlledUNet(base, ControlNet.from_base(base))
    x, t, cond, hint = inputs(base)
    with pytest.raises(ValueError, match=r"the control image has 3 channel\(s\); this ControlNet takes 1"):
        model(x, t, {**cond, "hint": hint.expand(-1, 3, -1, -1)})
    with pytest.raises(ValueError, match="the control image is 8x8; this ControlNet takes 16x16 for 16x16 samples"):
        model(x, t, {**cond, "hint": hint[..., :8, :8]})
    with pytest.raises(ValueError, match="got 2 control images for a batch of 3"):
        model(x, t, {**cond, "hint": hint[:2]})
    with pytest.raises(ValueError, match=r"needs the control image in cond\[\"hint\"\]"):
        model(x, t, cond)
    with pytest.raises(ValueError, match="a float"):
        model(x, t, {**cond, "hint": hint.long()})
    with pytest.raises(ValueError, match="made for a different base"):
        ControlledUNet(text_base(), ControlNet.from_base(class_base()))


def test_the_locked_base_gets_no_gradient_and_the_zero_convolutions_move_first():
    base = text_base().requires_grad_(False)  # as the training loop freezes it
    before = {k: v.clone() for k, v in base.state_dict().items()}
    control = ControlNet.from_base(base, hint_widths=(8, 16)).train()
    model = ControlledUNet(base, control)
    optimizer = torch.optim.AdamW(control.parameters(), lr=1e-3)
    x, t, cond, hint = inputs(base)
    target = torch.randn_like(x)
    last_hint_conv = control.hint_encoder[-1]
    for step in (1, 2):
        optimizer.zero_grad()
        (model(x, t, {**cond, "hint": hint}) - target).square().mean().backward()
        assert all(p.grad is None for p in base.parameters())
        optimizer.step()
        if step == 1:  # only the zero convolutions had a gradient: everything behind them is multiplied by 0
            assert all(conv.weight.abs().sum() > 0 for conv in control.zero_convs)
            assert not last_hint_conv.weight.any()
    assert last_hint_conv.weight.abs().sum() > 0  # the second step reaches the hint encoder through them
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

    # negative control: an optimizer over the whole controlled model (the base not locked) changes the base
    leaky = text_base().requires_grad_(True)
    reference = {k: v.clone() for k, v in leaky.state_dict().items()}
    whole = ControlledUNet(leaky, ControlNet.from_base(leaky))
    optimizer = torch.optim.AdamW(whole.parameters(), lr=1e-3)
    (whole(x, t, {**cond, "hint": hint}) - target).square().mean().backward()
    optimizer.step()
    assert not all(torch.equal(v, reference[k]) for k, v in leaky.state_dict().items())


def test_cfg_gives_the_unconditional_half_the_same_control_image():
    hint = torch.rand(2, 1, 16, 16)
    cond = {"context": torch.randn(2, 3, 16), "context_mask": torch.ones(2, 3, dtype=torch.bool), "hint": hint,
            "control_strength": torch.tensor([1.0, 0.5])}  # fmt: skip
    null = {"context": torch.randn(1, 1, 16), "context_mask": torch.ones(1, 1, dtype=torch.bool)}
    both = batch_conditions(cond, null, 2)
    assert torch.equal(both["hint"], torch.cat([hint, hint]))
    assert both["control_strength"].tolist() == [1.0, 0.5, 1.0, 0.5]


def test_a_controlnet_saves_and_loads_without_pickle(tmp_path):
    base = text_base()
    control = control_made_active(base)
    control.save_pretrained(tmp_path / "control")
    loaded = load_network(tmp_path / "control")
    assert isinstance(loaded, ControlNet) and loaded.config == control.config
    x, t, cond, hint = inputs(base)
    context = base.encode(cond["caption"])
    assert all(torch.equal(a, b) for a, b in zip(loaded(x, t, context, hint), control(x, t, context, hint)))


# ---------------------------------------------------------------- the training task and the model folder


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A text-to-image base model folder (16x16 shapes, v-prediction), as a trained run exports it."""
    folder = tmp_path_factory.mktemp("base") / "model"
    text_base().save_pretrained(folder)
    write_manifest(folder, new_manifest(
        schedule=Schedule.make("cosine", 100).to_config(), prediction="v", variance="fixed_small",
        sample_shape=[3, 16, 16], conditioning="text", null_caption="", thresholding="static",
        sample={"sampler": "ddim", "steps": 4, "guidance": 1.0}, data={"name": "shapes", "size": 16},
    ))  # fmt: skip
    return folder


def control_recipe(base, **train) -> Config:
    return Config.from_dict({
        "task": "control",
        "data": {"name": "shapes", "size": 16, "n": 64},
        "control": {"base": str(base), "hint": "mask", "hint_widths": [8, 16], "caption_dropout": 0.5},
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 1, "sample_every": 0, "checkpoint_every": 2,
                  "ema_decay": 0.9, "seed": 0, "device": "cpu", **train},
        "sample": {"sampler": "ddim", "steps": 3, "n": 4, "guidance": 1.0},
    })  # fmt: skip


@pytest.fixture(scope="module")
def control_run(base_folder, tmp_path_factory):
    return run(control_recipe(base_folder, sample_every=4), tmp_path_factory.mktemp("control") / "run")


def test_the_control_task_trains_the_branch_only_and_resumes_bit_for_bit(base_folder, control_run, tmp_path):
    records = read_log(control_run)
    assert len(records) == 4 and all(0 <= r["control_iou"] <= 1 and math.isfinite(r["loss"]) for r in records)
    state = load_checkpoint(latest_checkpoint(control_run))
    assert all(k.startswith(("trainable_copy.", "hint_encoder.", "zero_convs.")) for k in state["model"])
    assert set(state["frozen"]) == {"base"} and state["frozen"]["base"]["source"] == str(base_folder)
    assert all(state["model"][f"zero_convs.{i}.weight"].abs().sum() > 0 for i in range(5))
    # the base is the one it started from, bit for bit, and the export carries a copy of it
    original = load_file(base_folder / "model.safetensors")
    exported = load_file(control_run / "model" / "base" / "model.safetensors")
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    assert (control_run / "samples" / "step-0000004.png").is_file()

    half = run(control_recipe(base_folder, steps=2, sample_every=4), tmp_path / "half")
    run(None, half, resume=True, overrides=["train.steps=4"])
    assert without_timing(read_log(half)) == without_timing(records)
    resumed = load_checkpoint(latest_checkpoint(half))
    assert_identical(resumed["model"], state["model"])
    assert_identical(resumed["ema"], state["ema"])


def test_a_resumed_control_run_refuses_a_changed_base(base_folder, tmp_path):
    base = tmp_path / "base"
    Pipeline.from_pretrained(base_folder, device="cpu").save_pretrained(base)
    half = run(control_recipe(base, steps=2), tmp_path / "run")
    perturbed(load_network(base), seed=3).save_pretrained(base)
    with pytest.raises(ValueError, match="frozen module 'base' .* changed since the run started"):
        run(None, half, resume=True, overrides=["train.steps=4"])


def test_the_control_task_checks_its_recipe(base_folder, tmp_path):
    with pytest.raises(ValueError, match=r"needs \[control\] base"):
        run(control_recipe(""), tmp_path / "a")
    raw = control_recipe(base_folder).to_dict()
    with pytest.raises(ValueError, match=r"control.hint = 'depth' is not allowed; expected one of mask, edges, canny"):
        Config.from_dict({**raw, "control": {**raw["control"], "hint": "depth"}})
    with pytest.raises(ValueError, match="draws samples of shape"):
        run(Config.from_dict({**raw, "data": {"name": "shapes", "size": 32, "n": 16}}), tmp_path / "b")
    with pytest.raises(ValueError, match="leave \\[model\\] out"):
        run(Config.from_dict({**raw, "model": {"class": "UNet"}}), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_exported_model_samples_with_a_control_image(control_run, tmp_path):
    manifest = read_manifest(control_run / "model")
    assert manifest["components"] == {"denoiser": "base", "control": "."}
    assert manifest["control"]["hint"] == "mask" and manifest["control"]["size"] == [16, 16]
    assert manifest["conditioning"] == "text" and manifest["prediction"] == "v"
    pipe = Pipeline.from_pretrained(control_run, device="cpu")
    assert isinstance(pipe.network, ControlledUNet)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3:9, 5:12] = 1
    options = {"prompt": "a red square", "guidance": 2.0, "steps": 3, "seed": 0, "output_type": "pt"}
    x = pipe(n=2, control=mask, **options)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    assert torch.equal(pipe(n=2, control=tmp_path / "mask.png", **options), x)  # the PNG reads as the tensor
    assert not torch.equal(pipe(n=2, control=1 - mask, **options), x)

    # strength 0 samples exactly what the base samples alone
    base = Pipeline(pipe.denoiser.__class__(pipe.network.base, pipe.denoiser.schedule, "v", "fixed_small", (3, 16, 16)),
                    {k: v for k, v in manifest.items() if k != "control"})  # fmt: skip
    assert torch.equal(pipe(n=2, control=mask, control_strength=0.0, **options), base(n=2, **options))

    with pytest.raises(ValueError, match="this model is a ControlNet: give control="):
        pipe(n=2, **options)
    with pytest.raises(ValueError, match="is 8x8 \\(HxW\\); this model's control is 16x16"):
        pipe(n=2, control=mask[..., :8, :8], **options)
    with pytest.raises(ValueError, match="for ControlNet models; this is none"):
        base(n=2, control=mask, **options)

    copy = pipe.save_pretrained(tmp_path / "copy")  # the components go back where they came from
    assert read_manifest(copy)["components"] == manifest["components"]
    assert torch.equal(Pipeline.from_pretrained(copy, device="cpu")(n=2, control=mask, **options), x)


def test_difflab_sample_takes_a_control_png(control_run, tmp_path, capsys):
    from difflab.cli import main

    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    args = ["sample", str(control_run), "--control", str(tmp_path / "mask.png"), "--prompt", "a blue circle",
            "--n", "2", "--steps", "2", "--control-strength", "0.8", "--guess-mode", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert (out / "samples.png").is_file() and np.load(out / "samples.npz")["samples"].shape == (2, 3, 16, 16)
    with pytest.raises(SystemExit):
        main([*args[:-2], "--control-strength", "-1", "--out", str(out)])
    assert "--control-strength" in capsys.readouterr().err
