import json
import math
import signal

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflab.samplers import sample
from difflab.train import (
    Config,
    TrainingDiverged,
    TrainingInterrupted,
    load_config,
    load_pipeline,
    load_run_config,
    run,
)
from difflab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from difflab.train.monitor import read_log
from difflab.train.runner import make_trainer
from difflab.train.tasks import DiffusionTask
from test_train_support import assert_identical, tiny_config, without_timing


def test_a_run_writes_logs_pictures_checkpoints_and_the_model(tmp_path):
    config = tiny_config(train={"steps": 4, "sample_every": 2, "checkpoint_every": 2, "keep_checkpoints": 1})
    run_dir = run(config, tmp_path / "run")
    assert load_config(run_dir / "config.toml") == config
    records = read_log(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["lr"] == 1e-3 for r in records)
    assert Image.open(run_dir / "loss.png").size[0] > 100
    for step in (2, 4):
        grid = Image.open(run_dir / "samples" / f"step-{step:07d}.png")
        assert grid.size == (2 * 10 + 2, 2 * 10 + 2)  # n = 4 as 2x2 tiles of 8x8 with 2 px padding
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-4"]

    denoiser, meta = load_pipeline(run_dir)
    assert meta["sample_shape"] == [1, 8, 8] and meta["schedule"]["T"] == 100 and meta["num_classes"] is None
    ema = load_checkpoint(latest_checkpoint(run_dir))["ema"]["weights"]
    assert_identical(dict(denoiser.net.state_dict()), ema)  # the export holds the EMA weights
    x = sample(denoiser, (2, 1, 8, 8), "ddim", steps=3, progress=False, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert load_pipeline(run_dir / "model")[1] == meta
    # the model folder says how it was made: the resolved recipe and the training time
    assert load_config(run_dir / "model" / "recipe.toml") == config
    made = json.loads((run_dir / "model" / "training.json").read_text())
    assert made["steps"] == 4 and made["wall_seconds"] == records[-1]["train_s"] > 0
    assert [r["train_s"] for r in records] == sorted(r["train_s"] for r in records)

    with pytest.raises(ValueError, match="already holds a run"):
        run(config, run_dir)


def test_resuming_reproduces_an_uninterrupted_run_exactly(tmp_path):
    """2N steps in one go == N steps, then resume to 2N: same per-step logs, same final state.

    The recipe uses every source of state and randomness: importance-sampled t (history in
    the checkpoint), learned variance + hybrid loss, dropout, class labels,
    accumulation, warm-up, clipping and EMA with warm-up."""

    def recipe(steps):
        return tiny_config(
            model={"class": "TrainTinyNet", "num_classes": 10, "learn_sigma": True, "dropout": 0.2},
            diffusion={"T": 10, "importance": True, "loss_type": "hybrid", "variance": "learned"},
            train={"steps": steps, "batch_size": 16, "accumulate": 2, "warmup_steps": 3, "grad_clip": 0.5,
                   "checkpoint_every": 3},
        )  # fmt: skip

    whole = run(recipe(16), tmp_path / "whole")
    half = run(recipe(8), tmp_path / "half")
    run(None, half, resume=True, overrides=["train.steps=16"])

    assert without_timing(read_log(half)) == without_timing(read_log(whole))
    assert len(read_log(whole)) == 16
    a, b = (load_checkpoint(latest_checkpoint(r)) for r in (whole, half))
    assert a["step"] == b["step"] == 16
    assert_identical(a, b)  # weights, EMA, optimizer, scheduler, importance history, RNGs, config
    exported = [load_file(r / "model" / "model.safetensors") for r in (whole, half)]
    assert_identical(*exported)
    assert bool((a["task"]["timesteps"]["counts"] >= 10).all())  # importance sampling was in use


def test_resume_checks_the_config_and_the_folder(tmp_path):
    run_dir = run(tiny_config(train={"steps": 2}), tmp_path / "run")
    with pytest.raises(ValueError, match=r"\['train.lr'\]"):
        run(tiny_config(train={"steps": 4, "lr": 0.5}), run_dir, resume=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        run(None, tmp_path / "nothing", resume=True)
    with pytest.raises(ValueError, match="beyond train.steps"):
        run(None, run_dir, resume=True, overrides=["train.steps=1"])
    assert load_run_config(run_dir).train.steps == 2
    run(None, run_dir, resume=True, overrides=["train.steps=3", "train.log_every=5"])
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = DiffusionTask.loss

    def poisoned(self, model, batch, generator):
        calls["n"] += 1
        losses, logs = original(self, model, batch, generator)
        return (losses * float("nan") if calls["n"] >= 3 else losses), logs

    monkeypatch.setattr(DiffusionTask, "loss", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: loss = nan.*ckpt-2"):
        run(tiny_config(train={"steps": 6, "checkpoint_every": 2}), run_dir)
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-2"]
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run_dir / "model").exists()
    assert [r["step"] for r in read_log(run_dir)] == [1, 2]


def test_warmup_and_gradient_clipping(tmp_path):
    config = tiny_config(train={"steps": 6, "warmup_steps": 4, "grad_clip": 1e-3, "lr": 0.01})
    trainer = make_trainer(config, tmp_path)
    batches = trainer.batches()
    lrs = []
    for _ in range(6):
        stats = trainer.train_step(batches)
        lrs.append(stats["lr"])
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
        assert stats["grad_norm"] > 1e-2 and clipped.item() == pytest.approx(1e-3, rel=1e-4)
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_bf16_autocast_trains_with_float32_weights(tmp_path, monkeypatch):
    monkeypatch.setattr("difflab.devices.cpu_lacks_fast", lambda dtype: False)  # as on a CPU with bf16
    fp32 = read_log(run(tiny_config(train={"steps": 2}), tmp_path / "fp32"))
    bf16_dir = run(tiny_config(train={"steps": 2, "precision": "bf16"}), tmp_path / "bf16")
    bf16 = read_log(bf16_dir)
    assert all(math.isfinite(r["loss"]) for r in bf16)
    assert bf16[0]["loss"] != fp32[0]["loss"]  # autocast really ran in bf16 ...
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.05)  # ... computing the same thing
    weights = load_checkpoint(latest_checkpoint(bf16_dir))["model"]
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_bf16_on_a_cpu_without_bf16_instructions_trains_in_fp32_with_a_warning(tmp_path, monkeypatch):
    """There bf16 convolutions take PyTorch's reference path (~60x slower than fp32)."""
    monkeypatch.setattr("difflab.devices.cpu_lacks_fast", lambda dtype: dtype == torch.bfloat16)
    fp32 = read_log(run(tiny_config(train={"steps": 2}), tmp_path / "fp32"))
    with pytest.warns(UserWarning, match="no native bfloat16 instructions.*training in fp32 instead"):
        bf16 = read_log(run(tiny_config(train={"steps": 2, "precision": "bf16"}), tmp_path / "bf16"))
    assert [r["loss"] for r in bf16] == [r["loss"] for r in fp32]


def test_class_conditional_unet_trains_and_exports(tmp_path):
    unet = {
        "class": "UNet", "in_channels": 1, "model_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
        "attention_resolutions": [], "mid_attention": False, "norm_groups": 4, "num_classes": 10,
        "class_dropout_prob": 0.1,
    }  # fmt: skip
    run_dir = run(tiny_config(model=unet, train={"steps": 2, "sample_every": 2}), tmp_path / "unet")
    denoiser, meta = load_pipeline(run_dir)
    assert meta["num_classes"] == 10 and type(denoiser.net).__name__ == "UNet"
    assert (run_dir / "samples" / "step-0000002.png").is_file()
    json.loads((run_dir / "model" / "config.json").read_text())  # plain JSON, no pickle


def test_config_mismatches_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="no labels"):
        run(tiny_config(data={"name": "toy2d"}, model={"class": "TrainTinyNet", "num_classes": 3}), tmp_path / "a")
    with pytest.raises(ValueError, match="unknown task"):
        run(tiny_config(task="distill"), tmp_path / "b")
    with pytest.raises(ValueError, match="neither a run folder"):
        load_pipeline(tmp_path)


def test_a_stop_request_saves_the_finished_step_and_raises(tmp_path):
    """What the SIGTERM/SIGINT handler does, without sending a signal (see test_train_signals)."""
    trainer = make_trainer(tiny_config(train={"steps": 5, "checkpoint_every": 0}), tmp_path)
    trainer.stop_signal = signal.SIGTERM
    with pytest.raises(TrainingInterrupted, match="SIGTERM received: stopped after step 1") as err:
        trainer.fit()
    assert err.value.step == 1 and err.value.checkpoint.name == "ckpt-1"
    assert load_checkpoint(err.value.checkpoint)["step"] == 1


def test_data_loader_workers_do_not_change_the_run(tmp_path):
    config = tiny_config(train={"steps": 3, "checkpoint_every": 0})
    inline = run(config, tmp_path / "inline")
    workers = run(Config.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "num_workers": 2}}),
                  tmp_path / "workers")  # fmt: skip
    assert without_timing(read_log(inline)) == without_timing(read_log(workers))
