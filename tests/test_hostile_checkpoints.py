"""Damaged run folders: a resumed run falls back to the newest checkpoint that verifies (warning
about each one it skips, deleting none), reports a damaged file by its path, never trains on or
exports non-finite weights, and a run killed before its first checkpoint can be started again."""

import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.tensorfiles import read_header
from difflab.train import TrainingDiverged, run, save_config
from difflab.train.checkpoint import (
    CORRUPT_SUFFIX,
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    CheckpointSkipped,
    list_checkpoints,
    load_checkpoint,
)
from difflab.train.loop import STATE_KEYS
from difflab.train.monitor import read_log
from test_train_support import assert_identical, tiny_config, without_timing

# checkpoints at steps 2 and 4 (both kept), the model exported at step 4
RECIPE = {"train": {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 4-step run, and the same recipe trained to 6 steps in one go (the reference a
    resumed run must reproduce bit for bit)."""
    root = tmp_path_factory.mktemp("runs")
    base = run(tiny_config(**RECIPE), root / "base")
    whole = run(tiny_config(train={**RECIPE["train"], "steps": 6}), root / "whole")
    return base, whole


@pytest.fixture
def base(runs, tmp_path):
    """A fresh copy of the 4-step run to damage."""
    return shutil.copytree(runs[0], tmp_path / "run")


# ---------------------------------------------------------------- ways to damage a checkpoint
def edit_record(change):
    def damage(ckpt):
        record = json.loads((ckpt / STATE_FILE).read_text())
        change(record)
        (ckpt / STATE_FILE).write_text(json.dumps(record))

    return damage


def overwrite_tensor(name, data=b"\xff" * 64):
    """Write `data` over the start of one tensor's bytes (0xff bytes are NaN as float32)."""

    def damage(ckpt):
        path = ckpt / TENSORS_FILE
        raw = bytearray(path.read_bytes())
        start = 8 + int.from_bytes(raw[:8], "little") + read_header(path)[name]["data_offsets"][0]
        raw[start : start + len(data)] = data
        path.write_bytes(bytes(raw))

    return damage


def cut(fraction):
    def damage(ckpt):
        data = (ckpt / TENSORS_FILE).read_bytes()
        (ckpt / TENSORS_FILE).write_bytes(data[: int(len(data) * fraction)])

    return damage


def write(name, data):
    def damage(ckpt):
        (ckpt / name).write_bytes(data)

    return damage


def torch_save(ckpt):
    torch.save({"model": torch.zeros(3)}, ckpt / TENSORS_FILE)


def drop(*keys):
    def change(record):
        node = record
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return edit_record(change)


# name -> (damage, words the error must contain besides the file's path)
DAMAGES = {
    "tensors truncated": (cut(0.5), [TENSORS_FILE, "truncated"]),
    "tensors zero bytes": (write(TENSORS_FILE, b""), [TENSORS_FILE, "empty"]),
    "tensors header garbage": (write(TENSORS_FILE, b"\xff" * 200), [TENSORS_FILE, "not a safetensors file"]),
    "tensors a torch.save pickle": (torch_save, [TENSORS_FILE, "pickle"]),
    "tensors missing": (lambda c: (c / TENSORS_FILE).unlink(), [TENSORS_FILE, "missing"]),
    "state.json garbage": (write(STATE_FILE, b"{not json"), [STATE_FILE, "Expecting"]),
    "state.json empty": (write(STATE_FILE, b""), [STATE_FILE, "Expecting value"]),
    "state.json not UTF-8": (write(STATE_FILE, b"\xff\xfe"), [STATE_FILE, "decode"]),
    "state.json another format": (edit_record(lambda r: r.update(format="other")), [STATE_FILE, "format"]),
    "state.json another step": (edit_record(lambda r: r.update(step=999)), [STATE_FILE, "999"]),
    "optimizer state missing": (drop("state", "optimizer"), [STATE_FILE, "optimizer"]),
    "model missing": (drop("state", "model"), [STATE_FILE, "model"]),
    "a tensor reference dangling": (
        edit_record(lambda r: r["state"]["model"].update({"inp.weight": {"__tensor__": "model/gone"}})),
        ["model/gone", TENSORS_FILE],
    ),
    "0xff in the optimizer state": (overwrite_tensor("optimizer/state/0/exp_avg"), ["non-finite", "exp_avg"]),
    "0xff in the weights": (overwrite_tensor("model/inp.weight"), ["non-finite", "model/inp.weight"]),
    "0xff in the EMA": (overwrite_tensor("ema/weights/out.weight", b"\x00\x00\x80\x7f" * 4), ["non-finite", "ema"]),
}


def ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"ckpt-{step}"


@pytest.mark.parametrize("damage, words", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_checkpoint_is_reported_by_path_in_one_line(base, damage, words):
    damage(ckpt(base, 4))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(ckpt(base, 4), STATE_KEYS)
    message = str(error.value)
    assert str(ckpt(base, 4)) in message and "\n" not in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("damage, words", DAMAGES.values(), ids=DAMAGES.keys())
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(runs, base, damage, words):
    """ckpt-4 damaged: the run resumes from ckpt-2 with a warning naming ckpt-4, sets ckpt-4 aside
    (deleting nothing), and ends exactly where an uninterrupted run ends, with finite weights."""
    damage(ckpt(base, 4))
    with pytest.warns(CheckpointSkipped) as record:
        run(None, base, resume=True, overrides=["train.steps=6"])
    aside = ckpt(base, 4).with_name("ckpt-4" + CORRUPT_SUFFIX)
    assert [str(w.message).split(":")[0] for w in record] == [
        f"skipping the damaged checkpoint {ckpt(base, 4)}",
        f"set aside the damaged checkpoint as {aside}",
    ]
    assert aside.is_dir()  # kept for inspection, not deleted
    assert [p.name for p in list_checkpoints(base)] == ["ckpt-4", "ckpt-6"]  # rewritten, rotated as usual
    for path in list_checkpoints(base):
        load_checkpoint(path, STATE_KEYS)  # every checkpoint left verifies
    weights = load_file(base / "model" / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert_identical(weights, load_file(runs[1] / "model" / "model.safetensors"))
    assert without_timing(read_log(base)) == without_timing(read_log(runs[1]))


def test_the_cli_resumes_past_a_damaged_checkpoint(base, capsys):
    overwrite_tensor("optimizer/state/0/exp_avg")(ckpt(base, 4))  # the tester's 64 bytes of 0xff
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointSkipped)  # whatever filters pytest was given
        assert main(["train", "--resume", str(base), "--set", "train.steps=6"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [
        f"difflab train: warning: skipping the damaged checkpoint {ckpt(base, 4)}: {ckpt(base, 4) / TENSORS_FILE} "
        "holds non-finite values (NaN or inf) in 'optimizer/state/0/exp_avg'",
        f"difflab train: warning: set aside the damaged checkpoint as {ckpt(base, 4)}{CORRUPT_SUFFIX}",
    ]
    weights = load_file(base / "model" / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_when_no_checkpoint_verifies_the_error_lists_each_and_deletes_nothing(base, capsys):
    for step in (2, 4):
        cut(0.5)(ckpt(base, step))
    assert main(["train", "--resume", str(base), "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after a warning for each
    assert err.startswith("difflab train: error: none of the 2 checkpoints")
    assert str(ckpt(base, 2)) in err and str(ckpt(base, 4)) in err
    assert ckpt(base, 2).is_dir() and ckpt(base, 4).is_dir()


def test_an_optimizer_state_that_makes_the_weights_nan_stops_the_run_before_saving(base, capsys):
    """Finite but impossible optimizer state (a negative second moment) passes the file checks;
    the first update then makes weights NaN: the run stops naming the weight, and nothing of that
    step is saved or exported."""
    path = ckpt(base, 4) / TENSORS_FILE
    tensors = load_file(path)
    tensors["optimizer/state/0/exp_avg_sq"] = -tensors["optimizer/state/0/exp_avg_sq"] - 1.0
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "difflab-checkpoint"})
    exported = load_file(base / "model" / "model.safetensors")
    assert main(["train", "--resume", str(base), "--set", "train.steps=6"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "diverged at step 5" in err and "'inp.weight' is not finite" in err
    assert [p.name for p in list_checkpoints(base)] == ["ckpt-2", "ckpt-4"]  # nothing new saved
    assert_identical(load_file(base / "model" / "model.safetensors"), exported)  # the export is untouched
    with pytest.raises(TrainingDiverged, match="after the optimizer update"):
        run(None, base, resume=True, overrides=["train.steps=6"])


def test_a_checkpoint_that_does_not_fit_the_network_is_reported_by_path(base, capsys):
    drop("state", "model", "inp.weight")(ckpt(base, 4))  # verifies as a file, but lacks a weight
    assert main(["train", "--resume", str(base), "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot resume from {ckpt(base, 4)}" in err and "inp.weight" in err


# ---------------------------------------------------------------- killed before the first checkpoint
@pytest.fixture
def killed(tmp_path):
    """What a run killed (SIGKILL) before its first checkpoint leaves: its config, a log, a loss
    curve, but no checkpoint and no model."""
    run_dir = run(tiny_config(train={"steps": 3, "checkpoint_every": 0}), tmp_path / "killed")
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "model")
    assert (run_dir / "config.toml").is_file() and read_log(run_dir)
    return run_dir


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again_in_place(killed, tmp_path):
    config = tiny_config(**RECIPE)
    recipe = save_config(config, tmp_path / "recipe.toml")
    assert main(["train", str(recipe), "--out", str(killed)]) == 0
    assert [r["step"] for r in read_log(killed)] == [1, 2, 3, 4]  # the old log was started over
    fresh = run(config, tmp_path / "fresh")
    assert without_timing(read_log(killed)) == without_timing(read_log(fresh))
    assert_identical(*(load_file(r / "model" / "model.safetensors") for r in (killed, fresh)))


def test_resuming_such_a_run_says_how_to_start_it_again(killed, capsys):
    assert main(["train", "--resume", str(killed)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint" in err
    command = f"difflab train {killed / 'config.toml'} --out {killed}"
    assert command in err
    assert main(command.split()[1:]) == 0  # the command it gives works
    assert math.isfinite(read_log(killed)[-1]["loss"])


def test_a_finished_run_is_still_never_overwritten(runs, tmp_path, capsys):
    recipe = save_config(tiny_config(**RECIPE), tmp_path / "recipe.toml")
    assert main(["train", str(recipe), "--out", str(runs[0])]) == 2
    assert "already holds a run" in capsys.readouterr().err
