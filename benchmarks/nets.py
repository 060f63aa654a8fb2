"""Throughput of difflab's networks on CPU: training steps and sampling forwards.

Measures images/s for (a) a training step = forward + MSE backward + AdamW step and
(b) a sampling forward (no grad), at 32x32 with batch 64 and 2 threads, for

* a ~10M-parameter ADM U-Net, and diffusers' UNet2DModel in the closest configuration
  (same widths, blocks, attention placement, head size, scale-shift norm), timed
  interleaved with ours in the same run so machine load hits both alike; once as each
  library leaves memory layout, once with both models and inputs in channels_last;
* DiT-S/4 on 32x32x3 inputs;
* the U-Net in channels_last, and torch.compile'd forwards (each compile runs in a
  subprocess with a time limit; a failure or timeout is recorded, not raised);
* bf16 autocast (where the CPU has bf16 instructions): our U-Net under autocast against
  diffusers at its default fp32, and both under autocast, with the relative error bf16 costs.

Usage: ``python benchmarks/nets.py [--quick] [--out benchmarks/results/nets.json]``.
Reported numbers are medians over timed steps after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.nets import DiT, UNet, count_parameters, dit_config

THREADS = 2
RESULTS = Path(__file__).parent / "results" / "nets.json"

UNET_CONFIG = dict(
    in_channels=3, model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
    attention_resolutions=(2,), num_head_channels=32, use_scale_shift_norm=True,
)
DIT_NAME = "DiT-S/4"
DIT_OVERRIDES = dict(input_size=32, in_channels=3, num_classes=None, learn_sigma=False)


# --------------------------------------------------------------------------- models


def build(name: str) -> tuple[torch.nn.Module, callable]:
    """Return (model, call) where call(x, t) -> prediction tensor."""
    torch.manual_seed(0)
    if name == "unet":
        model = UNet(UNET_CONFIG)
        return model, model
    if name == "dit":
        model = DiT(dit_config(DIT_NAME, **DIT_OVERRIDES))
        return model, model
    if name == "diffusers_unet":
        from diffusers import UNet2DModel

        model = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3,
            block_out_channels=(64, 128, 128, 128), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=32, norm_num_groups=32, resnet_time_scale_shift="scale_shift",
            flip_sin_to_cos=True, freq_shift=0,
        )
        return model, lambda x, t: model(x, t).sample
    raise ValueError(f"unknown model {name!r}; choose unet, dit or diffusers_unet")


def diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


# --------------------------------------------------------------------------- timing


def make_batch(batch: int, size: int, channels_last: bool = False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t, torch.randn(batch, 3, size, size, generator=gen)


def train_step(model, call, batch, size, channels_last=False):
    x, t, target = make_batch(batch, size, channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(call(x, t), target).backward()
        optimizer.step()

    return step


def sample_step(model, call, batch, size, channels_last=False):
    x, t, _ = make_batch(batch, size, channels_last)
    model.eval()

    def step():
        with torch.no_grad():
            call(x, t)

    return step


def time_interleaved(steps: dict, warmup: int, repeats: int) -> dict[str, dict[str, list]]:
    """Warm up each step, then time them in turn (A, B, A, B, ...) so load drift is shared.

    Records wall-clock and process CPU time per step; CPU time (all threads) is the
    work done and is far less sensitive to other jobs on a shared machine.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: {"wall": [], "cpu": []} for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def summary(times: dict[str, list], batch: int) -> dict:
    median = statistics.median(times["wall"])
    return {
        "images_per_s": batch / median,
        "median_step_s": median,
        "median_cpu_s": statistics.median(times["cpu"]),
        "step_times_s": [round(t, 4) for t in times["wall"]],
    }


def speedup(base: dict[str, list], other: dict[str, list]) -> dict:
    """How much faster `other` is than `base` (> 1 = faster), three ways."""
    paired = [b / o for b, o in zip(base["wall"], other["wall"])]
    return {
        "wall_median_ratio": statistics.median(base["wall"]) / statistics.median(other["wall"]),
        "paired_wall_median_ratio": statistics.median(paired),
        "cpu_time_ratio": statistics.median(base["cpu"]) / statistics.median(other["cpu"]),
    }


# --------------------------------------------------------------------------- compile worker


def compile_worker(name: str, batch: int, size: int, repeats: int) -> dict:
    """Runs in a subprocess: compile the sampling forward of `name`, time it against eager."""
    torch.set_num_threads(THREADS)
    model, call = build(name)
    model.eval()
    compiled = torch.compile(call)
    x, t, _ = make_batch(batch, size)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(x, t)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        steps = {"eager": lambda: call(x, t), "compiled": lambda: compiled(x, t)}
        times = time_interleaved(steps, 1, repeats)
    return {
        "compile_s": compile_s,
        "eager": summary(times["eager"], batch),
        "compiled": summary(times["compiled"], batch),
        "speedup": speedup(times["eager"], times["compiled"]),
    }


def run_compile(name: str, batch: int, size: int, repeats: int, timeout: float) -> dict:
    command = [sys.executable, __file__, "--compile-worker", name, "--batch", str(batch),
               "--size", str(size), "--repeats", str(repeats)]
    # Caches off, so compile_s is a cold compile even after an earlier run on this machine.
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (compile too slow on this CPU)"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:500] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


class Budget:
    """Wall-clock budget for the whole run; later phases are skipped (and say so) past it."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.seconds - self.elapsed

    def log(self, message: str) -> None:
        print(f"[{self.elapsed:6.1f}s] {message}", flush=True)


def compare_with_diffusers(
    batch: int, size: int, warmup: int, repeats: int, channels_last: bool = False
) -> tuple[dict, dict | str]:
    """Ours vs diffusers, interleaved; returns (per-model timings, ours/theirs ratios).

    channels_last puts both models' weights and inputs in NHWC, so the two run the same
    memory layout (left alone, diffusers' attention reshape leaves every later activation
    in NHWC, while ours stays NCHW).
    """
    names = ["unet"] + (["diffusers_unet"] if diffusers_version() else [])
    models = {name: build(name) for name in names}
    timings = {name: {"parameters": count_parameters(model)} for name, (model, _) in models.items()}
    ratios = {}
    for model, _ in models.values():
        if channels_last:
            model.to(memory_format=torch.channels_last)
    for kind, maker in (("train", train_step), ("sample", sample_step)):
        steps = {
            name: maker(model, call, batch, size, channels_last=channels_last)
            for name, (model, call) in models.items()
        }
        times = time_interleaved(steps, warmup + (kind == "train"), repeats)
        for name in models:
            timings[name][kind] = summary(times[name], batch)
        if "diffusers_unet" in models:
            ratios[kind] = speedup(times["diffusers_unet"], times["unet"])
    if "diffusers_unet" not in models:
        return timings, "diffusers not importable; comparison skipped"
    ratios["meaning"] = "ours / diffusers throughput (> 1: ours is faster)"
    return timings, ratios


def bf16_call(call):
    """`call` under CPU bf16 autocast, its output back in fp32 (the sampler's precision)."""

    def run(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call(x, t).float()

    return run


def measure_bf16(batch: int, size: int, warmup: int, repeats: int) -> dict:
    """Ours under bf16 autocast vs diffusers in fp32 (each library's fastest stock CPU path:
    difflab's `train.precision = "bf16"` / `--dtype bf16`), and both under autocast."""
    if not diffusers_version():
        return {"error": "diffusers not importable; comparison skipped"}
    (ours, call), (theirs, their_call) = build("unet"), build("diffusers_unet")
    out = {"meaning": "ours / diffusers throughput (> 1: ours is faster)"}
    for label, their_fn in (("ours_bf16_vs_diffusers_fp32", their_call), ("both_bf16", bf16_call(their_call))):
        out[label] = {}
        for kind, maker in (("train", train_step), ("sample", sample_step)):
            steps = {
                "unet": maker(ours, bf16_call(call), batch, size),
                "diffusers_unet": maker(theirs, their_fn, batch, size),
            }
            times = time_interleaved(steps, warmup + (kind == "train"), repeats)
            out[label][kind] = speedup(times["diffusers_unet"], times["unet"])
    # what bf16 costs: the output of a U-Net with random (not zero-initialised) output weights
    torch.manual_seed(1)
    for p in ours.parameters():
        if not p.detach().abs().sum():
            p.data.normal_(0.0, 0.02)
    x, t, _ = make_batch(4, size)
    with torch.no_grad():
        ref, low = call(x, t), bf16_call(call)(x, t)
    out["bf16_relative_rms_error"] = ((low - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    return out


def measure_dit(results: dict, batch: int, size: int, warmup: int, repeats: int) -> None:
    dit, call = build("dit")
    entry = {"preset": DIT_NAME, "overrides": DIT_OVERRIDES, "parameters": count_parameters(dit)}
    for kind, maker in (("train", train_step), ("sample", sample_step)):
        times = time_interleaved({kind: maker(dit, call, batch, size)}, warmup, repeats)
        entry[kind] = summary(times[kind], batch)
    results["models"]["dit"] = entry


def measure_channels_last(batch: int, size: int, warmup: int, repeats: int) -> dict:
    """Our U-Net in NCHW vs channels_last (two copies with equal weights), interleaved.

    Training gets a single timed step: channels_last training is slow here.
    """
    (contiguous, call_a), (channels_last, call_b) = build("unet"), build("unet")
    channels_last.to(memory_format=torch.channels_last)
    layout = {}
    for kind, maker, timed in (("sample", sample_step, repeats), ("train", train_step, 1)):
        steps = {
            "contiguous": maker(contiguous, call_a, batch, size),
            "channels_last": maker(channels_last, call_b, batch, size, channels_last=True),
        }
        times = time_interleaved(steps, warmup, timed)
        layout[kind] = {name: summary(t, batch) for name, t in times.items()}
        layout[kind]["speedup"] = speedup(times["contiguous"], times["channels_last"])
    return layout


def measure_compile(batch: int, size: int, repeats: int, budget: Budget) -> dict:
    compiled = {
        "note": (
            "sampling forward only, in a subprocess with a time limit, interleaved with the "
            "eager model in that subprocess; compiling the backward too does not fit the "
            "budget on 2 cores."
        )
    }
    for name in ("dit", "unet"):
        timeout = min(240.0, budget.left - 15)
        if timeout < 60:
            compiled[name] = {"error": "skipped: benchmark time budget used up"}
            continue
        budget.log(f"torch.compile {name} (limit {timeout:.0f} s)")
        compiled[name] = run_compile(name, batch, size, repeats, timeout)
    return compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, 1 timed step, no compile")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--compile-worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_worker:
        print(json.dumps(compile_worker(args.compile_worker, args.batch, args.size, args.repeats)))
        return

    torch.set_num_threads(THREADS)
    batch, size = (4, 32) if args.quick else (64, 32)
    warmup, repeats = (1, 1) if args.quick else (1, 3)
    budget = Budget(570.0)
    compare_repeats = repeats if args.quick else 5
    results: dict = {
        "note": (
            "Timings taken on a shared 2-core CPU machine while other engineers were running "
            "jobs on it (load average 3-5): absolute numbers are noisy. Ours-vs-diffusers and "
            "NCHW-vs-channels_last are timed step by step interleaved in one process, so load "
            "hits both sides alike; their ratios are the trustworthy numbers."
        ),
        "environment": {
            "torch": torch.__version__, "diffusers": diffusers_version(),
            "python": platform.python_version(), "machine": platform.machine(),
            "threads": THREADS, "load_average_1_5_15_min_at_start": os.getloadavg(),
        },
        "settings": {
            "batch": batch, "resolution": size, "warmup_steps": warmup, "timed_steps": repeats,
            "comparison_timed_steps": compare_repeats,
            "comparison_train_warmup_steps": warmup + 1,
            "quick": args.quick, "statistic": "median step time",
            "train_step": "forward + MSE backward + AdamW(fused=True) step",
            "sample_step": "forward under torch.no_grad",
        },
        "models": {},
    }
    budget.log("U-Net vs diffusers UNet2DModel")
    timings, results["unet_vs_diffusers"] = compare_with_diffusers(
        batch, size, warmup, compare_repeats
    )
    results["models"].update(timings)
    results["models"]["unet"]["config"] = UNET_CONFIG
    budget.log("U-Net vs diffusers UNet2DModel, both channels_last")
    timings, ratios = compare_with_diffusers(batch, size, warmup, repeats, channels_last=True)
    results["unet_vs_diffusers_both_channels_last"] = {"ratios": ratios, "timings": timings}
    budget.log("bf16 autocast: U-Net vs diffusers")
    results["unet_bf16_autocast"] = measure_bf16(batch, size, warmup, compare_repeats)
    budget.log(DIT_NAME)
    measure_dit(results, batch, size, warmup, repeats)
    budget.log("U-Net channels_last")
    results["unet_channels_last"] = measure_channels_last(batch, size, warmup, repeats)
    results["dit_channels_last"] = "not measured: DiT works on token sequences after one conv"
    if args.quick:
        results["torch_compile_sample"] = "skipped in --quick"
    else:
        results["torch_compile_sample"] = measure_compile(batch, size, repeats, budget)
    results["environment"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
    results["total_seconds"] = budget.elapsed
    budget.log("done")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    summary_view = {
        "unet_vs_diffusers": results["unet_vs_diffusers"],
        "unet_vs_diffusers_both_channels_last": ratios,
        "unet_bf16_autocast": results["unet_bf16_autocast"],
        "total_seconds": results["total_seconds"],
    }
    print(json.dumps(summary_view, indent=2))


if __name__ == "__main__":
    main()
