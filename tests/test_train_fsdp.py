"""train.parallel = "fsdp" on two CPU processes (gloo) with a tiny DiT: the same training as
DDP to float tolerance, checkpoints sharded per process, and a resumed run equal bit for bit
to an uninterrupted one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflab.train.checkpoint import (
    CheckpointError,
    WorldSizeMismatch,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_readable,
)
from difflab.train.monitor import read_log
from test_train_support import assert_identical, torchrun, without_timing

SCRIPT = """
    import sys

    import torch
    import torch.distributed as dist

    from difflab.train import run
    from test_train_fsdp import tiny_dit_recipe

    torch.set_num_threads(1)
    out = sys.argv[1]
    dist.init_process_group("gloo")  # one group for the four runs (joining again in one process can hang)
    run(tiny_dit_recipe("fsdp", steps=4), f"{out}/fsdp")
    run(tiny_dit_recipe("fsdp", steps=2), f"{out}/resumed")
    run(None, f"{out}/resumed", resume=True, overrides=["train.steps=4"])
    run(tiny_dit_recipe("ddp", steps=4), f"{out}/ddp")
    dist.destroy_process_group()
"""


def tiny_dit_recipe(parallel: str, steps: int):
    """4 steps of a 2-block DiT on 8x8 digits, a global batch of 8 in 2 shards of 2 accumulated
    micro-batches, with EMA, label dropout, learned variance and the sample grid."""
    from difflab.train.config import Config

    return Config.from_dict({
        "task": "diffusion",
        "data": {"name": "digits", "size": 8},
        "model": {"class": "DiT", "input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 16,
                  "depth": 2, "num_heads": 2, "num_classes": 10, "class_dropout_prob": 0.2, "learn_sigma": True},
        "diffusion": {"schedule": "linear", "T": 10, "loss_type": "hybrid", "variance": "learned"},
        "train": {"steps": steps, "batch_size": 8, "accumulate": 2, "lr": 1e-2, "log_every": 1, "sample_every": 2,
                  "checkpoint_every": 2, "ema_decay": 0.5, "ema_warmup": False, "seed": 0, "device": "cpu",
                  "parallel": parallel, "keep_checkpoints": 2},
        "sample": {"sampler": "ddim", "steps": 2, "n": 2},
    })  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(SCRIPT, out)
    return out


def exported(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def test_fsdp_trains_like_ddp_to_float_tolerance(runs):
    fsdp, ddp = read_log(runs / "fsdp"), read_log(runs / "ddp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(fsdp, ddp, strict=True):
        for key in ("loss", "mse", "vb", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    weights, reference = exported(runs / "fsdp"), exported(runs / "ddp")  # the gathered EMA network
    assert sorted(weights) == sorted(reference)
    moved = 0
    for name, value in reference.items():  # Adam divides by sqrt(v): a 1e-7 gradient difference in a near-zero
        # gradient can move a weight by ~1e-6; 4 steps at lr 1e-2 move weights by up to 4e-2
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5)
        moved += not torch.equal(value, value.new_zeros(()).expand_as(value))
    assert moved > len(reference) // 2  # the comparison is not between untrained zero-initialised layers


def test_fsdp_checkpoints_hold_one_shard_per_process(runs):
    path = latest_checkpoint(runs / "fsdp")
    assert [p.name for p in list_checkpoints(runs / "fsdp")] == ["ckpt-2", "ckpt-4"]
    assert json.loads((path / "state.json").read_text())["shards"] == 2
    rank0, rank1 = (load_checkpoint(path, process=(r, 2)) for r in (0, 1))
    name = "blocks.0.mlp.0.weight"  # (64, 16): rows 0-31 on rank 0, 32-63 on rank 1
    for state in (rank0, rank1):
        for tree in (state["model"], state["ema"]["weights"]):
            assert tree[name].shape == [64, 16] and tree[name].tensor.shape == (32, 16)
    assert not torch.equal(rank0["model"][name].tensor, rank1["model"][name].tensor)
    # the exported network is the EMA's two shards put together
    halves = [state["ema"]["weights"][name].tensor for state in (rank0, rank1)]
    assert torch.equal(torch.cat(halves), exported(runs / "fsdp")[name])
    moments = [s["optimizer"]["state"][0]["exp_avg"] for s in (rank0, rank1)]  # Adam's moments are sharded too
    assert sum(m.tensor.numel() for m in moments) == torch.Size(moments[0].shape).numel()


def test_fsdp_resumed_run_equals_an_uninterrupted_one_bit_for_bit(runs):
    assert without_timing(read_log(runs / "resumed")) == without_timing(read_log(runs / "fsdp"))
    assert_identical(exported(runs / "resumed"), exported(runs / "fsdp"))
    for rank in (0, 1):
        a = load_checkpoint(latest_checkpoint(runs / "resumed"), process=(rank, 2))
        b = load_checkpoint(latest_checkpoint(runs / "fsdp"), process=(rank, 2))
        for part in ("model", "optimizer"):
            for (ka, va), (kb, vb) in zip(_leaves(a[part]), _leaves(b[part]), strict=True):
                assert ka == kb and torch.equal(va, vb), ka


def _leaves(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{path}/{i}")
    elif hasattr(tree, "tensor"):  # LocalShard
        yield path, tree.tensor
    elif isinstance(tree, torch.Tensor):
        yield path, tree


def test_a_sharded_checkpoint_refuses_another_world_size_and_a_missing_shard(runs, tmp_path):
    path = latest_checkpoint(runs / "fsdp")
    with pytest.raises(WorldSizeMismatch, match=r"sharded across 2 processes.*--nproc_per_node=2, not 1 process$"):
        load_checkpoint(path, process=(0, 1))
    with pytest.raises(WorldSizeMismatch):  # not a damaged checkpoint to skip and set aside: resuming stops
        newest_readable(runs / "fsdp", process=(0, 1))
    damaged = tmp_path / "ckpt-4"
    damaged.mkdir()
    for file in path.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    shards = load_file(damaged / "shard-1.safetensors")
    save_file({k: v for k, v in shards.items() if k != "model/blocks.0.mlp.0.weight"}, damaged / "shard-1.safetensors")
    load_checkpoint(damaged, process=(0, 2))  # rank 0 does not read rank 1's file
    with pytest.raises(CheckpointError, match=r"shard-1.safetensors lacks the shards \['model/blocks.0.mlp.0.weight"):
        load_checkpoint(damaged, process=(1, 2))


def test_fsdp_is_refused_for_a_task_that_edits_whole_weights_after_each_step():
    from difflab.train.distributed import Dist
    from difflab.train.loop import Trainer

    class Task:
        model = torch.nn.Linear(2, 2)

        def after_step(self, model, step):
            pass

    sharded = Dist(rank=0, world_size=2, parallel="fsdp")
    with pytest.raises(ValueError, match=r"train.parallel = 'fsdp' does not support the Task task yet"):
        Trainer(Task(), [0] * 8, tiny_dit_recipe("fsdp", steps=4), "unused", sharded)
