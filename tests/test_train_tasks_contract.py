"""The task contract the training loop relies on: frozen modules (never trained, never saved,
checked on resume), the after_step hook (state through extra_state), condition dropout owned
by the task (networks never drop), plain progress lines without a terminal, and nets/ that
import neither data/ nor train/."""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from difflab.nets import UNet, build_network
from difflab.train import run
from difflab.train.checkpoint import TENSORS_FILE, latest_checkpoint, list_checkpoints, load_checkpoint
from difflab.train.monitor import read_log
from difflab.train.runner import make_trainer
from difflab.train.tasks import TASKS, DataInfo, DiffusionTask, TextDiffusionTask
from difflab.train.tasks.conditions import drop_captions, drop_labels, drop_mask
from difflab.train.tasks.frozen import Frozen, fingerprint, freeze
from test_nets_support import perturbed
from test_train_support import TrainTinyNet, assert_identical, tiny_config, without_timing

TINY_UNET = dict(in_channels=1, model_channels=8, channel_mult=[1], num_res_blocks=1, attention_resolutions=[],
                 mid_attention=False, norm_groups=4)  # fmt: skip


# ---------------------------------------------------------------- a task with a frozen teacher
class TeacherTask:
    """The smallest task with a frozen module: a TrainTinyNet learns to match a frozen
    teacher's output on noised digits (a stand-in for distillation). [model] teacher = the
    folder the teacher was saved to with save_pretrained."""

    def __init__(self, config, data, dist=None):
        settings = dict(config.model)
        self.frozen = {"teacher": Frozen.load(settings.pop("teacher"))}
        self.model = build_network(settings)
        self.step = 0

    def loss(self, model, batch, generator):
        x = batch["x"]
        t = torch.randint(0, 100, (x.shape[0],), generator=generator).to(x.device)
        x_t = x + torch.randn(x.shape, generator=generator).to(x.device)
        target = self.frozen["teacher"].module(x_t, t)
        return (model(x_t, t) - target).square().flatten(1).mean(1), {}

    def sample_images(self, model, n, generator):
        return None

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass

    def export(self, model, directory):
        model.save_pretrained(directory)


@pytest.fixture
def teacher_recipe(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "teacher", TeacherTask)
    torch.manual_seed(123)
    folder = TrainTinyNet(hidden=8).save_pretrained(tmp_path / "teacher")

    def recipe(steps):
        model = {"class": "TrainTinyNet", "hidden": 8, "teacher": str(folder)}
        return tiny_config(task="teacher", model=model, train={"steps": steps, "checkpoint_every": 2})

    return recipe, folder


def test_a_frozen_module_is_never_trained_averaged_or_saved(tmp_path, teacher_recipe):
    recipe, folder = teacher_recipe
    (tmp_path / "run").mkdir()
    trainer = make_trainer(recipe(4), tmp_path / "run")
    teacher = trainer.task.frozen["teacher"].module
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.fit()

    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.parameters()}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert set(trainer.ema.model.state_dict()) == set(trainer.model.state_dict())
    assert_identical(dict(teacher.state_dict()), before)  # unchanged by 4 steps
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.device == trainer.device for p in teacher.parameters())

    state = load_checkpoint(latest_checkpoint(trainer.run_dir))
    assert state["frozen"] == {"teacher": {"source": str(folder), "fingerprint": fingerprint(teacher)}}
    for checkpoint in list_checkpoints(trainer.run_dir):
        tensors = load_file(str(checkpoint / TENSORS_FILE))
        assert not [k for k in tensors if k.startswith("frozen") or "teacher" in k]
        for name, weight in before.items():  # no copy of a teacher tensor under any name
            assert not any(t.shape == weight.shape and torch.equal(t, weight) for t in tensors.values()), name


def test_resuming_with_a_frozen_module_repeats_the_uninterrupted_run(tmp_path, teacher_recipe):
    recipe, _ = teacher_recipe
    whole = run(recipe(6), tmp_path / "whole")
    half = run(recipe(3), tmp_path / "half")
    run(None, half, resume=True, overrides=["train.steps=6"])
    assert without_timing(read_log(half)) == without_timing(read_log(whole))
    assert_identical(*(load_checkpoint(latest_checkpoint(r)) for r in (whole, half)))


def test_resume_refuses_a_frozen_module_that_changed(tmp_path, teacher_recipe):
    recipe, folder = teacher_recipe
    half = run(recipe(2), tmp_path / "half")
    torch.manual_seed(7)
    TrainTinyNet(hidden=8).save_pretrained(folder)  # someone retrained the teacher in place
    with pytest.raises(ValueError, match=rf"frozen module 'teacher' loaded from {re.escape(str(folder))} changed "):
        run(None, half, resume=True, overrides=["train.steps=4"])


def test_freeze_moves_to_the_device_in_eval_mode_and_refuses_shared_parameters():
    module = TrainTinyNet(dropout=0.5).train()
    weights = fingerprint(module)
    records = freeze({"encoder": Frozen(module, "somewhere")}, TrainTinyNet(), torch.device("meta"))
    assert records == {"encoder": {"source": "somewhere", "fingerprint": weights}}
    assert {p.device.type for p in module.parameters()} == {"meta"}
    assert not module.training and not any(p.requires_grad for p in module.parameters())

    trainable = TrainTinyNet()
    with pytest.raises(ValueError, match=r"frozen module 'base' \(from here\) shares parameters \['inp.weight'"):
        freeze({"base": Frozen(trainable, "here")}, trainable, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"frozen\['base'\] must be a Frozen\(module, source\), got TrainTinyNet"):
        freeze({"base": TrainTinyNet()}, trainable, torch.device("cpu"))


def test_fingerprint_sees_every_weight_and_only_weights():
    a, b = TrainTinyNet(), TrainTinyNet()
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    b.out.bias.data[0] += 1e-7
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a.train()) == fingerprint(a.eval().requires_grad_(False))


# ---------------------------------------------------------------- after_step
class TargetTask(DiffusionTask):
    """Keeps a target network, an EMA of the trained one updated in after_step (consistency
    models), and adds its distance to the loss, so a lost target changes later steps too."""

    trainer = None  # set by the test to watch the order of updates

    def __init__(self, config, data, dist=None):
        super().__init__(config, data, dist)
        self.target = copy.deepcopy(self.model).requires_grad_(False)
        self.calls = []

    def loss(self, model, batch, generator):
        losses, logs = super().loss(model, batch, generator)
        pull = sum((p - q).square().sum() for p, q in zip(model.parameters(), self.target.parameters()))
        return losses + pull, logs

    def after_step(self, model, step):
        seen = {"step": step, "grad_enabled": torch.is_grad_enabled(), "model": model}
        if self.trainer is not None:
            seen["ema_updates"] = self.trainer.ema.num_updates
            seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        self.calls.append(seen)
        for q, p in zip(self.target.parameters(), model.parameters()):
            q.lerp_(p, 0.5)

    def extra_state(self):
        return {**super().extra_state(), "target": self.target.state_dict()}

    def load_extra_state(self, state):
        super().load_extra_state(state)
        self.target.load_state_dict(state["target"])


def test_after_step_runs_once_per_update_after_the_optimizer_and_the_ema(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "target", TargetTask)
    trainer = make_trainer(tiny_config(task="target", train={"steps": 4, "accumulate": 2}), tmp_path)
    trainer.task.trainer = trainer
    trainer.fit()
    calls = trainer.task.calls
    assert [c["step"] for c in calls] == [1, 2, 3, 4]  # per optimizer step, not per micro-batch
    assert all(c["model"] is trainer.model and not c["grad_enabled"] for c in calls)
    assert [c["ema_updates"] for c in calls] == [1, 2, 3, 4]
    weights = load_checkpoint(latest_checkpoint(tmp_path))["model"]  # the step-4 checkpoint
    assert_identical(calls[-1]["weights"], weights)  # the hook saw the updated weights


def test_after_step_state_survives_resume_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "target", TargetTask)
    recipe = lambda steps: tiny_config(task="target", train={"steps": steps, "checkpoint_every": 2})  # noqa: E731
    whole = run(recipe(6), tmp_path / "whole")
    half = run(recipe(3), tmp_path / "half")
    run(None, half, resume=True, overrides=["train.steps=6"])
    assert without_timing(read_log(half)) == without_timing(read_log(whole))
    a, b = (load_checkpoint(latest_checkpoint(r)) for r in (whole, half))
    assert_identical(a, b)
    assert not torch.equal(a["task"]["target"]["out.bias"], a["model"]["out.bias"])  # a real, lagging target


# ---------------------------------------------------------------- condition dropout
def test_the_drop_mask_comes_from_the_generator_alone():
    y = torch.arange(64) % 10
    first = drop_labels(y, 0.5, 10, torch.Generator().manual_seed(3))
    torch.manual_seed(0)  # the global RNG plays no part
    assert torch.equal(drop_labels(y, 0.5, 10, torch.Generator().manual_seed(3)), first)
    assert not torch.equal(drop_labels(y, 0.5, 10, torch.Generator().manual_seed(4)), first)
    texts = [f"caption {i}" for i in range(64)]
    dropped = drop_captions(texts, 0.5, torch.Generator().manual_seed(3))
    assert dropped == drop_captions(texts, 0.5, torch.Generator().manual_seed(3))
    assert [c == "" for c in dropped] == (first == 10).tolist()  # one mask for labels and captions


@pytest.mark.parametrize("prob", [0.1, 0.5])
def test_dropped_labels_are_the_null_label_at_the_rate(prob):
    n = 20000
    y = torch.arange(n) % 7
    out = drop_labels(y, prob, 7, torch.Generator().manual_seed(0))
    dropped = out == 7
    # binomial(n, prob): 4.5 standard deviations either side (a false alarm about once in 150 000 runs,
    # while a rate 10% off is caught)
    assert abs(int(dropped.sum()) - n * prob) <= 4.5 * math.sqrt(n * prob * (1 - prob))
    assert torch.equal(out[~dropped], y[~dropped]) and out.dtype == y.dtype


def test_dropped_captions_are_empty_at_the_rate():
    n, prob = 20000, 0.3
    texts = [f"a red circle {i}" for i in range(n)]
    out = drop_captions(texts, prob, torch.Generator().manual_seed(0))
    dropped = [c == "" for c in out]
    assert abs(sum(dropped) - n * prob) <= 4.5 * math.sqrt(n * prob * (1 - prob))
    assert all(c == t for c, t, d in zip(out, texts, dropped) if not d)


def test_no_dropout_draws_nothing_and_bad_rates_are_refused():
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(5)
    assert drop_labels(y, 0.0, 5, generator) is y and drop_captions(["a"], 0.0, generator) == ["a"]
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
    assert drop_mask(3, 1.0, generator).all() and not drop_mask(3, 0.0, generator).any()
    for bad in (1.5, -0.1, "0.1", None):
        with pytest.raises(ValueError, match=rf"dropout probability must be a number in \[0, 1\], got {bad!r}"):
            drop_mask(3, bad, generator)
    with pytest.raises(ValueError, match="list of strings"):
        drop_captions("a red circle", 0.5, generator)


def test_the_network_never_drops_so_two_calls_see_the_same_condition():
    """Online and target network (student and teacher) are given one dropped condition."""
    torch.manual_seed(0)
    net = perturbed(UNet(num_classes=10, class_dropout_prob=0.5, **TINY_UNET)).train()
    plain = UNet(num_classes=10, class_dropout_prob=0.0, **TINY_UNET).train()
    plain.load_state_dict(net.state_dict())
    seen = []
    net.label_embed.embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    task = DiffusionTask(tiny_config(model={"class": "UNet", "num_classes": 10, "class_dropout_prob": 0.5,
                                            **TINY_UNET}), DataInfo((1, 8, 8), 10))  # fmt: skip
    y = torch.arange(32) % 10
    cond = task.condition({"y": y}, torch.Generator().manual_seed(0))
    assert (cond["y"] == 10).any() and (cond["y"] != 10).any()
    x, t = torch.randn(32, 1, 8, 8), torch.full((32,), 50.0)
    first, second = net(x, t, cond), net(x, t, cond)
    assert torch.equal(first, second) and torch.equal(seen[0], cond["y"]) and torch.equal(seen[1], cond["y"])
    assert torch.equal(net(x, t, {"y": y}), plain(x, t, {"y": y}))  # train mode, rate 0.5: labels as given


def test_the_text_task_drops_captions_from_the_step_generator():
    unet = {**TINY_UNET, "in_channels": 3, "mid_attention": True}
    model = {"class": "TextConditionalUNet", "caption_dropout_prob": 0.5, "unet": unet,
             "text_encoder": {"dim": 16, "depth": 1, "num_heads": 2}}  # fmt: skip
    task = TextDiffusionTask(tiny_config(task="text_diffusion", model=model),
                             DataInfo((3, 8, 8), None, ("a red circle",)))  # fmt: skip
    seen, encode = [], task.model.text_encoder.encode

    def spy(captions, device=None):
        seen.append(list(captions))
        return encode(captions, device)

    task.model.text_encoder.encode = spy
    captions = [f"a red circle at the top {side}" for side in ("left", "right")] * 8
    batch = {"x": torch.zeros(16, 3, 8, 8), "caption": captions}
    with torch.no_grad():
        task.loss(task.model.train(), batch, torch.Generator().manual_seed(5))
    assert seen == [drop_captions(captions, 0.5, torch.Generator().manual_seed(5))]  # drawn first, from the step's
    assert "" in seen[0] and set(seen[0]) - {""} <= set(captions)


# ---------------------------------------------------------------- progress without a terminal
def test_without_a_terminal_each_log_record_is_one_plain_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    trainer = make_trainer(tiny_config(train={"steps": 4, "log_every": 2, "checkpoint_every": 0}), tmp_path / "a")
    trainer.fit()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    records = read_log(tmp_path / "a")
    assert lines[0].split("  ")[1] == f"loss {records[0]['loss']:.4f}" and " it/s  eta " in lines[0]

    class Terminal:  # a terminal shows tqdm's bar instead
        def isatty(self):
            return True

        def write(self, text):
            raise AssertionError(f"printed {text!r} to a terminal")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Terminal())
    make_trainer(tiny_config(train={"steps": 2, "checkpoint_every": 0}), tmp_path / "b").fit()


# ---------------------------------------------------------------- layering
def test_networks_import_neither_data_nor_train():
    code = (
        "import sys, difflab.nets\n"
        "print(sorted(m for m in sys.modules if m.startswith(('difflab.data', 'difflab.train'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
