import json
import random

import numpy as np
import pytest
import torch

from difflab.train.checkpoint import (
    capture_rng,
    join_tensors,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    split_tensors,
)


def optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return opt.state_dict()


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_state_tree_round_trips_exactly_through_json():
    state = {
        "optimizer": optimizer_state(),  # int keys, tuples, 0-dim tensors
        "mixed": {1: "one", "two": (2.5, None, True)},
        "reserved": {"__tensor__": "not a tensor"},
        "floats": [0.1, float("inf"), -0.0],
        "bf16": torch.ones(2, dtype=torch.bfloat16),
    }
    tree, tensors = split_tensors(state)
    tree = json.loads(json.dumps(tree))
    assert set(tensors) == {"optimizer/state/0/step", "optimizer/state/0/exp_avg", "optimizer/state/0/exp_avg_sq",
                            "optimizer/state/1/step", "optimizer/state/1/exp_avg", "optimizer/state/1/exp_avg_sq",
                            "bf16"}  # fmt: skip
    assert_same(join_tensors(tree, tensors), state)


def test_tensors_are_copied_so_shared_storage_is_fine():
    weight = torch.arange(6.0)
    tree, tensors = split_tensors({"a": weight, "b": weight[:3]})
    weight.zero_()
    assert tensors["a"].tolist() == [0, 1, 2, 3, 4, 5] and tensors["b"].tolist() == [0, 1, 2]


def test_unsupported_values_are_rejected():
    with pytest.raises(ValueError, match="set"):
        split_tensors({"x": {1, 2}})


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    tree, tensors = split_tensors(capture_rng())
    restored = join_tensors(json.loads(json.dumps(tree)), tensors)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(restored)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_save_load_keep_and_latest(tmp_path):
    for step in (1, 2, 10, 3):
        path = save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep=3)
        assert path.name == f"ckpt-{step}"
    # keep the 3 highest steps (not the 3 most recent writes), no temporary folders left behind
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-2", "ckpt-3", "ckpt-10"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-10", "ckpt-2", "ckpt-3"]
    assert latest_checkpoint(tmp_path).name == "ckpt-10"
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 10 and state["w"].tolist() == [10.0, 10.0]
    assert sorted(f.name for f in latest_checkpoint(tmp_path).iterdir()) == ["state.json", "tensors.safetensors"]


def test_incomplete_and_temporary_folders_are_ignored(tmp_path):
    save_checkpoint(tmp_path, 5, {"w": torch.zeros(1)})
    (tmp_path / "checkpoints" / "ckpt-9").mkdir()  # a crash mid-copy by hand: no state.json
    (tmp_path / "checkpoints" / ".tmp-ckpt-7-123").mkdir()
    assert latest_checkpoint(tmp_path).name == "ckpt-5"
    assert latest_checkpoint(tmp_path / "empty") is None


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)})

    def full_disk(src, dst):
        raise OSError("no space left on device")

    with monkeypatch.context() as m:
        m.setattr("difflab.train.checkpoint.os.rename", full_disk)
        with pytest.raises(OSError, match="no space"):
            save_checkpoint(tmp_path, 2, {"w": torch.ones(1)}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-1"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["w"].item() == 0.0
    save_checkpoint(tmp_path, 3, {"w": torch.ones(1)}, keep=1)  # the next save cleans up
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-3"]


def test_loading_rejects_foreign_folders(tmp_path):
    with pytest.raises(ValueError, match="no state.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "state.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(tmp_path)
