"""SIGINT during training: a checkpoint of the last finished step, exit code 130, and a
resume from it that equals an uninterrupted run (log lines and final state)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from difflab.train import run
from difflab.train.checkpoint import latest_checkpoint, load_checkpoint
from difflab.train.monitor import read_log
from test_train_support import assert_identical, tiny_config, without_timing

TESTS = Path(__file__).parent
SCRIPT = """
    import sys

    import torch

    from difflab.train import TrainingInterrupted, run
    from test_train_support import tiny_config

    torch.set_num_threads(1)
    try:
        run(tiny_config(train={"steps": 100000, "log_every": 3, "checkpoint_every": 0}), sys.argv[1])
    except TrainingInterrupted as err:
        print("interrupted at", err.step, flush=True)
        sys.exit(128 + err.signum)
"""


def test_sigint_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(interrupted)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while len(read_log(interrupted)) < 2:  # mid-training: two log lines (6 steps) written
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err.decode()[-2000:]
    step = int(out.decode().split("interrupted at")[1])
    assert latest_checkpoint(interrupted).name == f"ckpt-{step}"
    assert step >= 6 and all(r["step"] <= step for r in read_log(interrupted))
    assert not (interrupted / "model").exists()  # unfinished: nothing exported

    steps = step + 4  # not a multiple of log_every unless by chance: the log window is resumed
    run(None, interrupted, resume=True, overrides=[f"train.steps={steps}"])
    whole = run(tiny_config(train={"steps": steps, "log_every": 3, "checkpoint_every": 0}), tmp_path / "whole")
    assert without_timing(read_log(interrupted)) == without_timing(read_log(whole))
    a, b = (load_checkpoint(latest_checkpoint(r)) for r in (interrupted, whole))
    assert_identical(a, b)
