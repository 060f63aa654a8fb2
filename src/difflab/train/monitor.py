"""What a run writes for people to watch it: `log.jsonl` (one JSON object per log line) and
`loss.png`. Only the main process writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

LOG_FILE = "log.jsonl"
LOSS_PLOT = "loss.png"


class LogWindow:
    """Running sums of the per-step statistics since the last log line. Its state goes into
    checkpoints, so a resumed run writes the same log lines as an uninterrupted one."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {key: value / self.count for key, value in self.sums.items()} if self.count else {}

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])


def progress_line(record: dict, total_steps: int) -> str:
    """One plain line per log record, for output that is not a terminal (where tqdm shows
    nothing): ``step 50/4000  loss 0.8376  1.3 it/s  eta 48m``."""
    step, rate = record["step"], record.get("it_s", 0.0)
    parts = [f"step {step}/{total_steps}", f"loss {record['loss']:.4f}"]
    if rate > 0 and math.isfinite(rate):
        parts += [f"{rate:.3g} it/s", f"eta {_duration((total_steps - step) / rate)}"]
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    """48s, 12m, 3h05m."""
    if seconds < 59.5:
        return f"{round(seconds)}s"
    minutes = round(seconds / 60)
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_log(run_dir: str | Path, record: dict) -> None:
    with open(Path(run_dir) / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(run_dir: str | Path, step: int) -> list[dict]:
    """Drop lines logged after `step` (written after the checkpoint a run resumes from, and
    about to be written again); return the lines kept."""
    kept = [r for r in read_log(run_dir) if r.get("step", 0) <= step]
    path = Path(run_dir) / LOG_FILE
    if path.exists():
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(path)
    return kept


def plot_loss(records: list[dict], path: str | Path, key: str = "loss") -> Path | None:
    """Loss against step (log scale when the values allow it); None when there is nothing to plot."""
    points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    if not points:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    steps, values = zip(*points)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, values, linewidth=1)
    if min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
