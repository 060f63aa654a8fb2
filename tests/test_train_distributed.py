"""Two CPU processes under torchrun (gloo): identical weights on both ranks, rank-0-only
files, and the same training as one process accumulating two micro-batches."""

import pytest
import torch
from safetensors.torch import load_file

from difflab.train import run
from difflab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from difflab.train.monitor import read_log
from test_train_support import assert_identical, distributed_recipe, torchrun

SCRIPT = """
    import sys

    import torch
    from safetensors.torch import save_file

    from difflab.train import run
    from difflab.train.loop import Trainer
    from test_train_support import distributed_recipe

    torch.set_num_threads(1)
    out = sys.argv[1]
    fit = Trainer.fit

    def fit_and_dump(self):  # every rank writes its final weights for the test to compare
        fit(self)
        weights = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        save_file(weights, f"{out}/rank{self.dist.rank}.safetensors")

    Trainer.fit = fit_and_dump
    run(distributed_recipe(accumulate=1), f"{out}/run")
"""


def test_two_processes_match_one_process_accumulating_two_micro_batches(tmp_path):
    torchrun(SCRIPT, tmp_path)

    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert_identical(rank0, rank1)  # DDP kept the replicas bit-identical

    two = tmp_path / "run"
    assert [r["step"] for r in read_log(two)] == [1, 2, 3, 4]  # written once, by rank 0
    assert [p.name for p in list_checkpoints(two)] == ["ckpt-2", "ckpt-4"]
    assert load_checkpoint(latest_checkpoint(two))["world_size"] == 2

    one = run(distributed_recipe(accumulate=2), tmp_path / "one")
    for a, b in zip(read_log(one), read_log(two), strict=True):
        for key in ("loss", "mse", "vb", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    single = load_checkpoint(latest_checkpoint(one))
    for name, value in single["model"].items():
        torch.testing.assert_close(rank0[name], value, rtol=0, atol=1e-6)
    # both processes recorded both shards' (t, loss) for importance sampling, in shard order
    history = load_checkpoint(latest_checkpoint(two))["task"]["timesteps"]
    assert torch.equal(history["counts"], single["task"]["timesteps"]["counts"])
    torch.testing.assert_close(history["losses"], single["task"]["timesteps"]["losses"], rtol=1e-5, atol=1e-6)
