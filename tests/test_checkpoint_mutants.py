"""Behaviour of difflab.train.checkpoint that the mutation run (benchmarks/mutation.py) showed untested:
the keys and tags of the state tree, exact error messages, folder discovery and ordering, what a
save writes (record, metadata, fsyncs, pruning, leftovers), verification on load, the fallback of
`newest_readable` and the names `set_aside` picks."""

from __future__ import annotations

import json
import linecache
import os
import random
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from difflab.train import checkpoint as ck
from difflab.train.checkpoint import (
    CheckpointError,
    CheckpointSkipped,
    Found,
    capture_rng,
    checkpoint_step,
    join_tensors,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_readable,
    restore_rng,
    save_checkpoint,
    set_aside,
    split_tensors,
)
from test_messages_support import exact


def record_of(path):
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- split / join
def test_a_lone_tensor_is_stored_under_the_key_tensor():
    tree, tensors = split_tensors(torch.ones(2))
    assert tree == {"__tensor__": "tensor"}
    assert list(tensors) == ["tensor"]


def test_split_tensors_adds_to_the_dict_it_is_given():
    given = {}
    tree, tensors = split_tensors({"a": torch.zeros(1)}, tensors=given)
    assert tensors is given and list(given) == ["a"]


def test_split_tensors_keys_follow_the_tree_paths():
    state = {"a": [torch.zeros(1), (torch.ones(1), 3)], "b": {"c": torch.ones(2)}, 7: torch.zeros(3)}
    tree, tensors = split_tensors(state)
    assert tree == {"__items__": [
        ["a", [{"__tensor__": "a/0"}, {"__tuple__": [{"__tensor__": "a/1/0"}, 3]}]],
        ["b", {"c": {"__tensor__": "b/c"}}],
        [7, {"__tensor__": "7"}],
    ]}  # fmt: skip
    assert list(tensors) == ["a/0", "a/1/0", "b/c", "7"]


def test_split_tensors_nests_paths_below_a_given_prefix():
    tree, tensors = split_tensors({"w": torch.ones(1), 2: torch.ones(1)}, "root")
    assert set(tensors) == {"root/w", "root/2"}


def test_dicts_with_reserved_keys_are_tagged_as_items():
    tree, _ = split_tensors({"__x": 1, "y": 2})
    assert tree == {"__items__": [["__x", 1], ["y", 2]]}
    assert join_tensors(json.loads(json.dumps(tree)), {}) == {"__x": 1, "y": 2}


def test_plain_string_keyed_dicts_stay_plain():
    tree, _ = split_tensors({"a": 1, "b_": [None, True, 2.5, "s"]})
    assert tree == {"a": 1, "b_": [None, True, 2.5, "s"]}


def test_stored_tensors_are_contiguous_detached_copies():
    base = torch.arange(6.0, requires_grad=True)
    view = base.view(2, 3).t()
    _, tensors = split_tensors({"v": view})
    stored = tensors["v"]
    assert stored.is_contiguous() and not stored.requires_grad
    assert torch.equal(stored, view.detach())
    assert stored.data_ptr() != base.data_ptr()


def test_two_tensors_with_one_key_are_an_error():
    with pytest.raises(ValueError, match=exact("two tensors in the checkpoint state map to the same key 'a/b'")):
        split_tensors({"a/b": torch.ones(1), "a": {"b": torch.ones(1)}})


def test_an_unsupported_value_is_named_with_its_path():
    with pytest.raises(ValueError, match=exact(
        "cannot store set at 'a/0' in a checkpoint; use tensors or JSON values"
    )):  # fmt: skip
        split_tensors({"a": [set()]})


def test_join_reports_a_dangling_tensor_reference():
    with pytest.raises(ValueError, match=exact(
        "checkpoint state refers to tensor 'x', which tensors.safetensors lacks"
    )):  # fmt: skip
        join_tensors({"__tensor__": "x"}, {})


def test_join_leaves_dicts_with_more_than_one_key_as_dicts():
    tree = {"__tensor__": "x", "other": 1}
    assert join_tensors(tree, {"x": torch.ones(1)}) == tree


def test_join_rebuilds_tuples_items_and_lists():
    t = torch.ones(1)
    tree = {"__items__": [[1, {"__tuple__": [{"__tensor__": "k"}, 2]}]]}
    out = join_tensors(tree, {"k": t})
    assert out == {1: (t, 2)} and type(out[1]) is tuple and out[1][0] is t
    assert join_tensors([{"__tensor__": "k"}, 5], {"k": t}) == [t, 5]
    assert join_tensors(3, {}) == 3


# ---------------------------------------------------------------- RNG
def test_rng_state_survives_json_and_restores_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    assert isinstance(state["numpy"]["state"]["key"], list)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    tree, tensors = split_tensors(state)
    restored = join_tensors(json.loads(json.dumps(tree)), tensors)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(restored)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


# ---------------------------------------------------------------- folders
def test_checkpoint_step_reads_only_whole_names(tmp_path):
    assert checkpoint_step(tmp_path / "ckpt-12") == 12
    assert checkpoint_step("ckpt-007") == 7
    for name in ("ckpt-12.corrupt", "xckpt-1", "ckpt-", "ckpt-a", ".tmp-ckpt-3-1"):
        assert checkpoint_step(name) is None


def make(root, *names, state_file=True):
    for name in names:
        (root / name).mkdir(parents=True)
        if state_file:
            (root / name / "state.json").write_text("{}")


def test_list_checkpoints_sorts_by_step_number_and_needs_state_json(tmp_path):
    make(tmp_path / "checkpoints", "ckpt-10", "ckpt-9", "ckpt-100", "ckpt-2.corrupt")
    make(tmp_path / "checkpoints", "ckpt-50", state_file=False)
    (tmp_path / "checkpoints" / "ckpt-60").write_text("a file")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-9", "ckpt-10", "ckpt-100"]
    assert list_checkpoints(tmp_path / "checkpoints") == list_checkpoints(tmp_path)
    assert latest_checkpoint(tmp_path).name == "ckpt-100"


def test_a_missing_run_has_no_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path / "nowhere") == []
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert latest_checkpoint(tmp_path) is None


def test_a_run_folder_is_searched_directly_when_it_has_no_checkpoints_folder(tmp_path):
    make(tmp_path, "ckpt-3")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-3"]


# ---------------------------------------------------------------- saving
def test_save_writes_the_record_and_tensors_with_metadata(tmp_path):
    final = save_checkpoint(tmp_path / "deep" / "run", 5, {"w": torch.arange(3.0), "n": 1})
    assert final == tmp_path / "deep" / "run" / "checkpoints" / "ckpt-5"
    assert sorted(p.name for p in final.iterdir()) == ["state.json", "tensors.safetensors"]
    assert record_of(final) == {"format": "difflab-checkpoint", "version": 1, "step": 5,
                                "state": {"w": {"__tensor__": "w"}, "n": 1}}  # fmt: skip
    with safe_open(str(final / "tensors.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "difflab-checkpoint"}
        assert torch.equal(f.get_tensor("w"), torch.arange(3.0))
    assert sorted(p.name for p in final.parent.iterdir()) == ["ckpt-5"]


def test_save_fsyncs_both_files_the_folder_and_the_parent(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    opened = {}
    real_open = os.open

    def fake_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = (os.path.basename(str(path)), flags)
        return fd

    monkeypatch.setattr(ck.os, "open", fake_open)
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (synced.append(opened[fd]), real_fsync(fd)))
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)})
    names = [name for name, _ in synced]
    assert names[:2] == ["tensors.safetensors", "state.json"]
    assert names[2].startswith(".tmp-ckpt-1-") and names[3] == "checkpoints" and len(names) == 4
    assert all(flags == os.O_RDONLY for _, flags in synced)


def test_fsync_closes_the_file_even_when_fsync_fails(tmp_path, monkeypatch):
    closed = []
    real_close = os.close
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk")))
    monkeypatch.setattr(ck.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError, match="disk"):
        ck._fsync(tmp_path / "f")
    assert len(closed) == 1


def test_an_existing_step_is_never_rewritten(tmp_path):
    first = save_checkpoint(tmp_path, 3, {"v": 1})
    again = save_checkpoint(tmp_path, 3, {"v": 2})
    assert again == first and record_of(first)["state"] == {"v": 1}


def test_an_incomplete_folder_of_the_same_step_is_replaced(tmp_path):
    make(tmp_path / "checkpoints", "ckpt-4", state_file=False)
    (tmp_path / "checkpoints" / "ckpt-4" / "junk").write_text("x")
    final = save_checkpoint(tmp_path, 4, {"v": 1})
    assert sorted(p.name for p in final.iterdir()) == ["state.json", "tensors.safetensors"]


def test_a_leftover_temporary_folder_of_this_process_is_replaced(tmp_path):
    tmp = tmp_path / "checkpoints" / f".tmp-ckpt-4-{os.getpid()}"
    make(tmp_path / "checkpoints", tmp.name, state_file=False)
    (tmp / "junk").write_text("x")
    final = save_checkpoint(tmp_path, 4, {"v": 1})
    assert sorted(p.name for p in final.iterdir()) == ["state.json", "tensors.safetensors"]


def test_keep_prunes_the_oldest_and_removes_temporary_folders(tmp_path):
    for step in (1, 2, 10):
        save_checkpoint(tmp_path, step, {"s": step})
    make(tmp_path / "checkpoints", ".tmp-ckpt-99-1", "ckpt-0.corrupt", state_file=False)
    save_checkpoint(tmp_path, 20, {"s": 20}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-0.corrupt", "ckpt-10", "ckpt-20"]


def test_without_keep_nothing_is_pruned_or_cleaned(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"s": step})
    make(tmp_path / "checkpoints", ".tmp-ckpt-99-1", state_file=False)
    assert len(list_checkpoints(tmp_path)) == 3
    assert (tmp_path / "checkpoints" / ".tmp-ckpt-99-1").is_dir()


def test_keep_one_keeps_only_the_newest(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"s": step}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-2"]


# ---------------------------------------------------------------- loading
def test_load_round_trips_a_saved_state(tmp_path):
    state = {"w": torch.arange(4.0), 3: (1, "a"), "i": torch.tensor([1, 2])}
    loaded = load_checkpoint(save_checkpoint(tmp_path, 2, state), required=("w", 3))
    assert loaded.keys() == state.keys() and loaded[3] == (1, "a")
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["i"], state["i"])


def test_load_names_a_folder_without_state_json(tmp_path):
    with pytest.raises(CheckpointError, match=exact(f"{tmp_path} is not a checkpoint: it has no state.json")):
        load_checkpoint(tmp_path)


def test_load_names_unreadable_json(tmp_path):
    (tmp_path / "state.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{tmp_path / 'state.json'} cannot be read: Expecting")):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("record, found", [
    ({"format": "other", "version": 1}, "('other', 1)"),
    ({"format": "difflab-checkpoint", "version": 2}, "('difflab-checkpoint', 2)"),
    ({"version": 1}, "(None, 1)"),
    ([1, 2], "'list'"),
])  # fmt: skip
def test_load_names_a_foreign_format_or_version(tmp_path, record, found):
    (tmp_path / "state.json").write_text(json.dumps(record))
    message = f"{tmp_path / 'state.json'} has format/version {found}; this difflab reads 'difflab-checkpoint' 1"
    with pytest.raises(CheckpointError, match=exact(message)):
        load_checkpoint(tmp_path)


def test_load_checks_the_step_against_the_folder_name(tmp_path):
    ckpt = save_checkpoint(tmp_path, 6, {"v": 1})
    moved = ckpt.rename(ckpt.with_name("ckpt-7"))
    with pytest.raises(CheckpointError, match=exact(f"{moved / 'state.json'} says step 6, but the folder is ckpt-7")):
        load_checkpoint(moved)
    other = moved.rename(tmp_path / "elsewhere")  # a folder not named ckpt-N is not checked
    assert load_checkpoint(other) == {"v": 1}


def test_load_reports_a_state_tree_that_does_not_fit_its_tensors(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, {"v": torch.ones(1)})
    record = record_of(ckpt)
    record["state"] = {"v": {"__tensor__": "gone"}}
    (ckpt / "state.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=exact(
        f"{ckpt}: checkpoint state refers to tensor 'gone', which tensors.safetensors lacks"
    )):  # fmt: skip
        load_checkpoint(ckpt)
    record["state"] = {"__items__": [1]}  # cannot unpack: TypeError
    (ckpt / "state.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{ckpt}: ")):
        load_checkpoint(ckpt)


def test_load_reports_a_damaged_tensors_file_with_its_own_message(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, {"v": torch.ones(1)})
    (ckpt / "tensors.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="^" + re.escape(str(ckpt / "tensors.safetensors") + " is empty")):
        load_checkpoint(ckpt)


def test_required_keys_are_listed_when_missing(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, {"model": 1})
    with pytest.raises(CheckpointError, match=exact(
        f"{ckpt / 'state.json'} lacks ['optimizer', 'ema']: the checkpoint is incomplete or damaged"
    )):  # fmt: skip
        load_checkpoint(ckpt, required=iter(["model", "optimizer", "ema"]))


def test_required_keys_need_a_state_dict(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, [1, 2])
    with pytest.raises(CheckpointError, match=exact(f"{ckpt / 'state.json'} holds no state dict")):
        load_checkpoint(ckpt, required=["model"])
    assert load_checkpoint(ckpt) == [1, 2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_float_tensors_are_named_by_their_path(tmp_path, bad):
    ckpt = save_checkpoint(tmp_path, 1, {"a": [{"b": torch.tensor([0.0, bad])}], "ok": torch.ones(2)})
    with pytest.raises(CheckpointError, match=exact(
        f"{ckpt / 'tensors.safetensors'} holds non-finite values (NaN or inf) in 'a/0/b'"
    )):  # fmt: skip
        load_checkpoint(ckpt)


def test_tensor_paths_cover_dicts_lists_and_tuples():
    t = torch.ones(1)
    tree = {"a": [t, (t, {"b": t})], 3: t}
    assert [path for path, _ in ck._tensors(tree)] == ["a/0", "a/1/0", "a/1/1/b", "3"]
    assert list(ck._tensors(t)) == [("", t)]


def test_integer_tensors_are_not_checked_for_finiteness(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, {"i": torch.tensor([2**40])})
    assert load_checkpoint(ckpt)["i"].tolist() == [2**40]


# ---------------------------------------------------------------- newest_readable / set_aside
def test_newest_readable_is_none_without_checkpoints(tmp_path):
    assert newest_readable(tmp_path) is None


def test_newest_readable_skips_damaged_newer_checkpoints_with_a_warning(tmp_path):
    good = save_checkpoint(tmp_path, 1, {"model": 1})
    bad_a = save_checkpoint(tmp_path, 2, {"model": 2})
    bad_b = save_checkpoint(tmp_path, 3, {"other": 3})
    (bad_a / "state.json").write_text("{")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = newest_readable(tmp_path, required=["model"])
    assert found == Found(good, {"model": 1}, [bad_b, bad_a])
    assert [w.category for w in caught] == [CheckpointSkipped, CheckpointSkipped]
    assert str(caught[0].message).startswith(f"skipping the damaged checkpoint {bad_b}: {bad_b / 'state.json'} lacks")


def test_newest_readable_returns_the_newest_when_it_verifies(tmp_path):
    save_checkpoint(tmp_path, 1, {"model": 1})
    newest = save_checkpoint(tmp_path, 2, {"model": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert newest_readable(tmp_path, ["model"]) == Found(newest, {"model": 2}, [])


def test_newest_readable_lists_every_problem_when_none_verifies(tmp_path):
    a = save_checkpoint(tmp_path, 1, {"x": 1})
    b = save_checkpoint(tmp_path, 2, {"x": 2})
    with pytest.warns(CheckpointSkipped), pytest.raises(CheckpointError) as raised:
        newest_readable(tmp_path, ["model"])
    lack = "lacks ['model']: the checkpoint is incomplete or damaged"
    assert str(raised.value) == (
        f"none of the 2 checkpoints of {tmp_path} can be read: {b / 'state.json'} {lack}; "
        f"{a / 'state.json'} {lack}. Move them away to train it again from the start"
    )
    assert list_checkpoints(tmp_path) == [a, b]


def test_found_skipped_defaults_to_a_fresh_list(tmp_path):
    one, two = Found(tmp_path, {}), Found(tmp_path, {})
    assert one.skipped == [] and one.skipped is not two.skipped


def test_set_aside_renames_with_a_counter_when_taken(tmp_path):
    names = []
    for _ in range(3):
        make(tmp_path, "ckpt-5")
        names.append(set_aside(tmp_path / "ckpt-5").name)
    assert names == ["ckpt-5.corrupt", "ckpt-5.corrupt-1", "ckpt-5.corrupt-2"]
    assert not (tmp_path / "ckpt-5").exists()
    assert list_checkpoints(tmp_path) == []


# ---------------------------------------------------------------- CUDA RNG (simulated on the CPU)
class FakeCuda:
    """torch.cuda as seen by capture_rng/restore_rng: availability, initialisation, device count
    and the RNG states, recording what restore_rng sets."""

    def __init__(self, monkeypatch, available=True, initialised=True, devices=1):
        self.states, self.set = [torch.tensor([1, 2], dtype=torch.uint8)] * devices, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: self.states)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set.append)


def test_cuda_rng_states_are_captured_once_cuda_is_initialised(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    assert capture_rng()["cuda"] is cuda.states


@pytest.mark.parametrize("available, initialised", [(True, False), (False, True), (False, False)])
def test_cuda_rng_states_are_not_captured_before_cuda_is_in_use(monkeypatch, available, initialised):
    FakeCuda(monkeypatch, available, initialised)
    assert "cuda" not in capture_rng()


def test_cuda_rng_states_are_restored_on_the_same_number_of_devices(monkeypatch):
    state = capture_rng()
    cuda = FakeCuda(monkeypatch, devices=2)
    restore_rng({**state, "cuda": ["a", "b"]})
    assert cuda.set == [["a", "b"]]


@pytest.mark.parametrize("available, devices, saved", [(False, 1, ["a"]), (True, 2, ["a"]), (True, 1, None)])
def test_cuda_rng_states_are_left_alone_without_a_matching_saved_state(monkeypatch, available, devices, saved):
    state = capture_rng()
    cuda = FakeCuda(monkeypatch, available, devices=devices)
    restore_rng(state if saved is None else {**state, "cuda": saved})
    assert cuda.set == []


# ---------------------------------------------------------------- leftovers and warnings
def test_a_stray_file_named_like_a_temporary_folder_does_not_stop_pruning(tmp_path):
    save_checkpoint(tmp_path, 1, {"s": 1})
    (tmp_path / "checkpoints" / ".tmp-ckpt-stray").write_text("not a folder")
    save_checkpoint(tmp_path, 2, {"s": 2}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-2"]


def test_the_skip_warning_is_attributed_to_a_caller_not_to_the_warn_call(tmp_path):
    save_checkpoint(tmp_path, 1, {"model": 1})
    (save_checkpoint(tmp_path, 2, {"model": 2}) / "state.json").write_text("{")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        newest_readable(tmp_path)
    (warning,) = caught
    assert "warnings.warn(" not in linecache.getline(warning.filename, warning.lineno)
