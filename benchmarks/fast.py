"""Fast sampling by training, measured: progressive distillation (PD), consistency distillation
(CD), consistency training (CT) and improved CT (iCT) at 1, 2, 4 and 8 network evaluations,
against the teacher at DDIM-50 and the undistilled teacher (DDIM, DPM-Solver++) at the same NFE.

    python benchmarks/fast.py [--n 1000] [--teacher digits-ddpm] [--pd runs/digits-pd] [--cd runs/digits-cd]
                              [--ct runs/digits-ct] [--ict runs/digits-ict] [--keep METHOD ...]

`--keep` takes the named methods' rows ("teacher" for the three teacher rows) from the existing
--out file instead of measuring them again (a run that finished later is added without redoing
the rest); their picture rows are drawn again from the same seed, 16 samples each.

Needs the runs of configs/digits-pd.toml (and digits-v.toml, its teacher), digits-cd.toml and
digits-ct.toml (iCT: the overrides in its header); a missing run is skipped and reported.
Writes benchmarks/results/fast.json and fast.png (one row of samples per method and NFE).
Goals (ratios of digits FD to the teacher's DDIM-50 FD, same sample count; PD's teacher is
the v-prediction model of --pd-teacher, whose DDIM-50 is measured too): CD 1 step <= 2.0,
2 steps <= 1.5; PD 4 steps <= 1.3, 1 step <= 4; CT/iCT 1 step <= 4 and iCT better than CT;
every distilled model better than the undistilled teacher at the same NFE; one-step sampling
of 100 digits in under 1 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from difflab.data.images import save_grid
from difflab.eval.report import evaluate_digits, format_metrics
from difflab.pipelines import Pipeline, read_manifest

RESULTS = Path(__file__).resolve().parent / "results"
NFES = (1, 2, 4, 8)
TEACHER_ROWS = ("teacher ddim-50", "teacher ddim", "teacher dpmpp_2m")
PD_TEACHER = "PD teacher ddim-50"


def pd_rounds(run: Path) -> dict[int, Path]:
    """NFE -> the PD round whose student takes that many steps."""
    rounds = {}
    for folder in sorted(run.glob("round-*")):
        model = folder / "model"
        if (model / "diffusion.json").is_file():
            rounds[read_manifest(model)["sample"]["steps"]] = model
    return rounds


def measure(pipe: Pipeline, n: int, seed: int, **settings) -> tuple[dict, torch.Tensor]:
    denoiser, cond = pipe.condition(n)
    metrics, samples = evaluate_digits(denoiser, n=n, seed=seed, cond=cond, **pipe.settings(**settings))
    return metrics, samples


def one_step_seconds(pipe: Pipeline, repeats: int = 3) -> float:
    """Wall time of 100 one-step samples (best of `repeats`, after a warm-up)."""
    pipe.generate(100, steps=1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.generate(100, steps=1)
        times.append(time.perf_counter() - start)
    return min(times)


def training_seconds(model_dirs: list[Path]) -> float | None:
    total = 0.0
    for model in model_dirs:
        record = model / "training.json"
        if not record.is_file():
            return None
        total += json.loads(record.read_text())["wall_seconds"] or 0.0
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="digits-ddpm")
    p.add_argument("--pd", type=Path, default=Path("runs/digits-pd"))
    p.add_argument("--pd-teacher", type=Path, default=Path("runs/digits-v"), help="the v-prediction teacher of --pd")
    p.add_argument("--cd", type=Path, default=Path("runs/digits-cd"))
    p.add_argument("--ct", type=Path, default=Path("runs/digits-ct"))
    p.add_argument("--ict", type=Path, default=Path("runs/digits-ict"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "fast.json")
    p.add_argument("--keep", nargs="*", default=[], metavar="METHOD",
                   help='methods whose rows --out already has ("teacher", "consistency distillation", ...)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kept = kept_rows(args.out, args.keep, args.n)

    result = {"machine": f"{platform.machine()}, {args.threads} torch threads", "n": args.n, "methods": {},
              "skipped": []}  # fmt: skip
    rows: list[torch.Tensor] = []

    def record(method: str, nfe: int | str, metrics: dict, samples: torch.Tensor) -> None:
        result["methods"].setdefault(method, {})[str(nfe)] = metrics
        rows.append(samples[:16])
        print(f"{method:<22} NFE {nfe}: " + format_metrics(metrics), flush=True)

    def measured(method: str, pipe: Pipeline, nfe: int, **settings) -> dict:
        """The row of `method` at `nfe`: kept from --out (its picture drawn again) or measured."""
        if method in kept:
            metrics = kept[method][str(nfe)]
            record(method, nfe, metrics, pipe.generate(16, seed=args.seed, steps=nfe, **settings))
        else:
            metrics, samples = measure(pipe, args.n, args.seed, steps=nfe, **settings)
            record(method, nfe, metrics, samples)
        return metrics

    teacher = Pipeline.from_pretrained(args.teacher, device="cpu")
    reference = measured("teacher ddim-50", teacher, 50, sampler="ddim")
    for nfe in NFES:
        for sampler in ("ddim", "dpmpp_2m"):
            measured(f"teacher {sampler}", teacher, nfe, sampler=sampler)

    own_reference = None  # PD distils its own (v-prediction) teacher: its DDIM-50 is PD's reference too
    if (args.pd_teacher / "model" / "diffusion.json").is_file() or (args.pd_teacher / "diffusion.json").is_file():
        pd_teacher = Pipeline.from_pretrained(args.pd_teacher, device="cpu")
        own_reference = measured(PD_TEACHER, pd_teacher, 50, sampler="ddim")

    methods: dict[str, dict[int, Path]] = {}
    rounds = pd_rounds(args.pd)
    methods["progressive distillation"] = {nfe: rounds[nfe] for nfe in NFES if nfe in rounds}
    for name, run in (("consistency distillation", args.cd), ("consistency training", args.ct),
                      ("improved CT", args.ict)):  # fmt: skip
        if (run / "model" / "diffusion.json").is_file():
            methods[name] = dict.fromkeys(NFES, run / "model")
    for name, by_nfe in methods.items():
        if not by_nfe:
            result["skipped"].append(name)
            continue
        for nfe, model in by_nfe.items():
            metrics = measured(name, Pipeline.from_pretrained(model, device="cpu"), nfe)
            metrics["fd_ratio_to_teacher_ddim50"] = metrics["digits_fd"] / reference["digits_fd"]
            if name == "progressive distillation" and own_reference is not None:
                metrics["fd_ratio_to_own_teacher_ddim50"] = metrics["digits_fd"] / own_reference["digits_fd"]
        one_step = by_nfe.get(1)
        if name in kept:
            for key in ("one_step_seconds_per_100", "training_seconds"):
                result["methods"][name][key] = kept[name].get(key)
            continue
        if one_step is not None:
            result["methods"][name]["one_step_seconds_per_100"] = one_step_seconds(
                Pipeline.from_pretrained(one_step, device="cpu")
            )
        result["methods"][name]["training_seconds"] = training_seconds(
            sorted(args.pd.glob("round-*/model")) if name == "progressive distillation" else [by_nfe[NFES[0]]]
        )
    result["skipped"] += [m for m in ("consistency distillation", "consistency training", "improved CT")
                          if m not in methods]  # fmt: skip
    result["goals"] = goals(result["methods"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    save_grid(torch.cat(rows), args.out.with_suffix(".png"), nrow=16)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}; goals: {result['goals']}")


def kept_rows(out: Path, names: list[str], n: int) -> dict:
    """The rows of the methods `names` ("teacher" standing for its three) from the file `out`,
    which must have been measured with the same sample count `n` (FD depends on it)."""
    if not names:
        return {}
    if not out.is_file():
        raise SystemExit(f"--keep needs an earlier result in {out}; there is none")
    methods = json.loads(out.read_text())["methods"]
    wanted = [m for name in names for m in (TEACHER_ROWS if name == "teacher" else [name])]
    missing = [m for m in wanted if m not in methods]
    if missing:
        raise SystemExit(f"--keep: {out} has no rows for {missing}; it has {sorted(methods)}")
    counts = {row["num_samples"] for m in wanted for row in methods[m].values() if isinstance(row, dict)}
    if counts != {n}:
        raise SystemExit(f"--keep: the kept rows were measured with {sorted(counts)} samples, this run with --n {n}")
    return {m: methods[m] for m in wanted}


def goals(m: dict) -> dict:
    """Each goal of the issue as true/false (None where its method was not measured)."""

    def ratio(method: str, nfe: int) -> float | None:
        row = m.get(method, {}).get(str(nfe), {})  # PD against its own teacher where that was measured
        return row.get("fd_ratio_to_own_teacher_ddim50", row.get("fd_ratio_to_teacher_ddim50"))

    def at_most(value: float | None, bound: float) -> bool | None:
        return None if value is None else value <= bound

    out = {
        "cd_1_step_le_2.0": at_most(ratio("consistency distillation", 1), 2.0),
        "cd_2_steps_le_1.5": at_most(ratio("consistency distillation", 2), 1.5),
        "pd_4_steps_le_1.3": at_most(ratio("progressive distillation", 4), 1.3),
        "pd_1_step_le_4": at_most(ratio("progressive distillation", 1), 4.0),
        "ct_1_step_le_4": at_most(ratio("consistency training", 1), 4.0),
        "ict_1_step_le_4": at_most(ratio("improved CT", 1), 4.0),
    }
    ct, ict = ratio("consistency training", 1), ratio("improved CT", 1)
    out["ict_better_than_ct"] = None if ct is None or ict is None else ict < ct
    beats = []
    for method in ("progressive distillation", "consistency distillation", "consistency training", "improved CT"):
        for nfe in NFES:
            fd = m.get(method, {}).get(str(nfe), {}).get("digits_fd")
            if fd is not None:
                best = min(m[f"teacher {s}"][str(nfe)]["digits_fd"] for s in ("ddim", "dpmpp_2m"))
                beats.append(fd < best)
    out["every_distilled_beats_the_teacher_at_equal_nfe"] = all(beats) if beats else None
    seconds = [v.get("one_step_seconds_per_100") for v in m.values() if isinstance(v, dict)]
    seconds = [s for s in seconds if s is not None]
    out["one_step_100_digits_under_1s"] = min(seconds) < 1.0 if seconds else None
    return out


if __name__ == "__main__":
    main()
