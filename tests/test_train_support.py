"""A tiny registered network and recipe shared by the training tests (and their subprocesses,
which import this file by putting tests/ on PYTHONPATH)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nets import ConfigModule, NetConfig
from difflab.train.config import Config


@dataclass(frozen=True)
class TrainTinyNetConfig(NetConfig):
    channels: int = 1
    hidden: int = 8
    num_classes: int | None = None
    learn_sigma: bool = False
    dropout: float = 0.0


class TrainTinyNet(ConfigModule):
    """conv -> + time/label embedding -> dropout -> conv: a few hundred parameters."""

    config_class = TrainTinyNetConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.inp = nn.Conv2d(c.channels, c.hidden, 3, padding=1)
        self.time = nn.Linear(1, c.hidden)
        self.label = nn.Embedding(c.num_classes, c.hidden) if c.num_classes else None
        self.drop = nn.Dropout(c.dropout)
        self.out = nn.Conv2d(c.hidden, c.channels * (2 if c.learn_sigma else 1), 3, padding=1)

    def forward(self, x, t, cond=None):
        h = self.inp(x) + self.time((t.float() / 100.0)[:, None])[:, :, None, None]
        if self.label is not None:
            h = h + self.label(cond["y"])[:, :, None, None]
        return self.out(self.drop(F.silu(h)))


def tiny_config(**sections) -> Config:
    """A recipe that trains TrainTinyNet on 8x8 digits in well under a second per few steps.
    `sections` maps a section to new values: [data] and [model] are replaced, the keys given
    for [diffusion], [train] and [sample] are changed (e.g. train={"steps": 4})."""
    raw = {
        "task": "diffusion",
        "data": {"name": "digits", "size": 8},
        "model": {"class": "TrainTinyNet", "hidden": 8},
        "diffusion": {"schedule": "linear", "T": 100},
        "train": {
            "steps": 4,
            "batch_size": 8,
            "lr": 1e-3,
            "log_every": 1,
            "sample_every": 0,
            "checkpoint_every": 2,
            "ema_decay": 0.9,
            "seed": 0,
            "device": "cpu",
        },
        "sample": {"sampler": "ddim", "steps": 4, "n": 4},
    }
    for name, values in sections.items():
        if name in ("diffusion", "train", "sample"):
            raw[name] = {**raw.get(name, {}), **values}
        else:
            raw[name] = values
    return Config.from_dict(raw)


def torchrun(script: str, out: Path, processes: int = 2, timeout: float = 600) -> None:
    """Run `script` (python source, dedented here) under torchrun with `processes` CPU processes
    and `out` as its argument; tests/ is on its path. Fails the test with the script's stderr."""
    import os
    import socket
    import subprocess
    import sys
    import textwrap

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = out / "script.py"
    path.write_text(textwrap.dedent(script))
    paths = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
        f"--master_port={port}", str(path), str(out),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, timeout=timeout)
    assert result.returncode == 0, result.stderr.decode()[-4000:]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("it_s", "train_s")} for r in records]


def assert_identical(a, b, where="state"):
    """Exact equality of two state trees, tensors bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_tiny_net_shapes_and_registration():
    from difflab.nets import build_network

    net = build_network({"class": "TrainTinyNet", "num_classes": 3, "learn_sigma": True})
    out = net(torch.zeros(2, 1, 8, 8), torch.tensor([0.0, 5.0]), {"y": torch.tensor([0, 2])})
    assert out.shape == (2, 2, 8, 8)
    assert sum(p.numel() for p in net.parameters()) < 2000




def distributed_recipe(accumulate: int) -> Config:
    """4 steps of a global batch of 8 cut into 2 shards (2 processes, or 2 micro-batches):
    importance sampling, learned variance, class labels and dropout all in play."""
    return tiny_config(
        model={"class": "TrainTinyNet", "num_classes": 10, "learn_sigma": True, "dropout": 0.2},
        diffusion={"T": 10, "importance": True, "loss_type": "hybrid", "variance": "learned"},
        train={"steps": 4, "batch_size": 8, "accumulate": accumulate, "grad_clip": 0.5},
    )
