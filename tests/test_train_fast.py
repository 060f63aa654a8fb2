"""Training tasks of the fast samplers on tiny recipes: progressive distillation in rounds and
consistency models (CD, CT, iCT), exported as model folders that `Pipeline` samples with
the steps they were trained for, and resumed bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from difflab.pipelines import Pipeline, read_manifest
from difflab.train import run
from difflab.train.checkpoint import latest_checkpoint, load_checkpoint
from difflab.train.monitor import read_log
from test_train_support import assert_identical, tiny_config, without_timing


@pytest.fixture(scope="module")
def v_teacher(tmp_path_factory):
    """A tiny v-prediction digits model (8x8): the teacher of every test here."""
    folder = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(diffusion={"schedule": "cosine", "T": 100, "prediction": "v"}, train={"steps": 3})
    return run(cfg, folder / "run") / "model"


def _pd(teacher, **distill):
    return tiny_config(task="progressive_distillation", model={}, diffusion={"T": 100},
                       distill={"teacher": str(teacher), **distill}, train={"steps": 2})  # fmt: skip


def _cm(teacher=None, model=None, **consistency):
    c = {"teacher": str(teacher)} if teacher else {}
    return tiny_config(task="consistency", model=model or {}, diffusion={"schedule": "cosine", "T": 100},
                       consistency={**c, **consistency}, train={"steps": 4, "checkpoint_every": 2})  # fmt: skip


def test_progressive_distillation_rounds_halve_the_steps_and_chain_teachers(v_teacher, tmp_path):
    last = run(_pd(v_teacher, teacher_steps=8, rounds=3), tmp_path / "pd")
    assert last == tmp_path / "pd" / "round-3"
    steps = []
    for r in (1, 2, 3):
        manifest = read_manifest(tmp_path / "pd" / f"round-{r}" / "model")
        d = manifest["distillation"]
        assert d["teacher_steps"] == 8 >> (r - 1) and manifest["sample"]["steps"] == 4 >> (r - 1)
        expected_teacher = v_teacher if r == 1 else tmp_path / "pd" / f"round-{r - 1}" / "model"
        assert d["teacher"] == str(expected_teacher)
        assert manifest["sample"]["spacing"] == "trailing" and len(d["student_timesteps"]) == 4 >> (r - 1)
        steps.append(manifest["sample"]["steps"])
    assert steps == [4, 2, 1] and read_manifest(last / "model")["distillation"]["student_timesteps"] == [99]
    pipe = Pipeline.from_pretrained(last, device="cpu")
    assert pipe.settings() == {"sampler": "ddim", "steps": 1, "spacing": "trailing", "eta": 0.0}
    x = pipe.generate(3, seed=1)
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1 + 1e-6
    # each round starts from the previous student with a fresh optimizer (a new run folder)
    state = load_checkpoint(latest_checkpoint(tmp_path / "pd" / "round-2"))
    assert state["frozen"]["teacher"]["source"] == str(tmp_path / "pd" / "round-1" / "model")
    assert state["optimizer"]["state"][0]["step"] == 2  # 2 updates in this round only


def test_progressive_distillation_refuses_an_eps_teacher(tmp_path):
    eps = run(tiny_config(diffusion={"T": 100}, train={"steps": 1}), tmp_path / "eps") / "model"
    with pytest.raises(ValueError, match="needs a v- or x0-prediction model"):
        run(_pd(eps, teacher_steps=4), tmp_path / "pd")
    assert not (tmp_path / "pd" / "log.jsonl").exists()


def test_a_rounds_run_resumes_at_the_first_unfinished_round(v_teacher, tmp_path, monkeypatch):
    from difflab.train import runner

    calls = []
    original = runner.make_trainer
    monkeypatch.setattr(runner, "make_trainer", lambda c, d, dist=None: calls.append(d.name) or original(c, d, dist))
    run(_pd(v_teacher, teacher_steps=4, rounds=2), tmp_path / "pd")
    assert calls == ["round-1", "round-2"]
    with pytest.raises(ValueError, match="already holds rounds"):
        run(_pd(v_teacher, teacher_steps=4, rounds=2), tmp_path / "pd")
    (tmp_path / "pd" / "round-2" / "model" / "diffusion.json").unlink()  # as if killed before round 2's export
    run(None, tmp_path / "pd", resume=True)
    assert calls == ["round-1", "round-2", "round-2"]


@pytest.mark.parametrize("curriculum", ["fixed", "ct", "ict"])
def test_consistency_distillation_and_training_export_one_step_models(v_teacher, tmp_path, curriculum):
    cd = run(_cm(v_teacher, curriculum=curriculum, levels=6), tmp_path / "cd") / "model"
    ct = run(_cm(model={"class": "TrainTinyNet", "hidden": 8}, curriculum=curriculum), tmp_path / "ct") / "model"
    for folder, method in ((cd, "distillation"), (ct, "training")):
        manifest = read_manifest(folder)
        assert manifest["prediction"] == "consistency" and manifest["consistency"]["method"] == method
        assert manifest["sample"]["sampler"] == "consistency" and manifest["sample"]["steps"] == 1
        pipe = Pipeline.from_pretrained(folder, device="cpu")
        assert pipe.denoiser.sigma_data == 0.5
        x = pipe.generate(2, seed=0)
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
        assert not torch.equal(pipe.generate(2, seed=0, steps=2), x)  # multistep re-noises


def test_the_cd_target_network_is_the_ema_of_the_online_one(v_teacher, tmp_path):
    # one step from the teacher's weights: target_1 = mu teacher + (1 - mu) online_1, mu = 0.3
    run_dir = run(_cm(v_teacher, target_ema=0.3), tmp_path / "cd", overrides=["train.steps=1"])
    state = load_checkpoint(latest_checkpoint(run_dir))
    teacher, online, target = load_file(v_teacher / "model.safetensors"), state["model"], state["task"]["target"]
    for name in teacher:
        torch.testing.assert_close(target[name], 0.3 * teacher[name] + 0.7 * online[name], atol=1e-7, rtol=1e-6)
    assert not torch.equal(online["inp.weight"], teacher["inp.weight"])  # the online network did move
    # and the exported model is the target network, not the online one
    exported = load_file(run_dir / "model" / "model.safetensors")
    assert all(torch.equal(exported[k], target[k]) for k in exported)


def test_consistency_runs_resume_bit_for_bit(v_teacher, tmp_path):
    recipe = _cm(v_teacher, curriculum="ct", curriculum_steps=4, levels=6)
    whole = run(recipe, tmp_path / "whole")
    half = run(recipe, tmp_path / "half", overrides=["train.steps=2"])
    run(None, half, resume=True, overrides=["train.steps=4"])
    assert without_timing(read_log(half)) == without_timing(read_log(whole))
    a, b = (load_checkpoint(latest_checkpoint(r)) for r in (whole, half))
    assert_identical(a["task"], b["task"])  # the target network
    assert_identical(a["model"], b["model"])
    records = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert [r["levels"] for r in records] == [2.0, 76.0, 107.0, 131.0]  # N(k) of CT grows during training
