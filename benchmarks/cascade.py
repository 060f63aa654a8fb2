"""Cascade benchmark (Ho et al. 2021; Imagen, Saharia et al. 2022): what a base model followed by
a super-resolution stage buys over one model trained directly at the high resolution.

For digits (digits-cfg 16x16 -> runs/digits-sr32, against runs/digits32-direct; labels 0-9 in
turn, judged by the shipped 32x32 digits classifier: digits FD against the test digits and the
share classified as the label asked for) and shapes (shapes-text 32x32 -> runs/shapes-sr64,
against runs/shapes64-direct; the captions of the first n test scenes, judged at 64x64 by the
shipped attribute judge: attribute FD against those scenes, share with every attribute right):

1. equal time: the cascade and the direct model, each with its own default sampling settings;
   training time from each model's training.json (the cascade's is base + stage; the shipped
   base's record comes from another machine, so --base-seconds can give its time measured here).
   Goal: the cascade better on FD and accuracy at about equal time.
2. augmentation ablation: stages trained without augmentation (RUN-none), with non-truncated
   (RUN) and truncated (RUN-truncated) augmentation, each swept over the level s it samples with
   (--levels; "none" only at 0; truncated: the levels on its base's steps). The base's samples
   are drawn once and shared (a truncated stage stops the base's chain at s instead). Goal: the
   best augmented FD <= 0.8x the unaugmented stage's.
3. consistency: real test images downsampled to x_low and super-resolved (their own labels or
   captions, the stage's default s and s = 0): RMSE of downsample(SR(x_low)) against x_low,
   against the same for the real image's down-up round trip, downsample(upsample(x_low)) (the
   stage's own upsampling). Goal: <= 2x.
4. guidance and thresholding: the base's guidance w in --ws with static or dynamic (Imagen,
   percentile 0.995) thresholding on every stage: share of saturated pixels (|x| >= 0.98) of the
   final images and of the base's, accuracy and FD. Goal at w >= 5: dynamic halves the
   saturated share with no loss of accuracy (2 points at most). Digits and shapes backgrounds
   are at -1 and shapes' colours at +-1, so real images are partly saturated: their share is
   reported beside (real_saturated).

    python benchmarks/cascade.py [--runs runs] [--only digits|shapes] [--n-digits 300] [--n-shapes 100]
    python benchmarks/cascade.py --quick       # smoke run: 8 samples, 3 steps per stage
    python benchmarks/cascade.py --only digits --sections equal_time   # re-measure one section, keep the rest

Runs (missing ones are skipped, and listed under "skipped" with the command that trains them):
    difflab train configs/digits-sr32.toml --out runs/digits-sr32
    difflab train configs/digits-sr32.toml --out runs/digits-sr32-none --set superres.augmentation=none
    difflab train configs/digits-sr32.toml --out runs/digits-sr32-truncated --set superres.augmentation=truncated
    difflab train configs/digits32-direct.toml --out runs/digits32-direct
    (and the same for shapes with configs/shapes-sr64.toml, runs/shapes-sr64*, configs/shapes64-direct.toml)

Writes benchmarks/results/cascade.json, cascade.png (the curves) and cascade-samples-DATASET.png
(rows: base | cascade | direct). --only and --sections keep what the JSON already holds of the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from difflab.data.images import save_grid
from difflab.data.resize import downsample, upsample
from difflab.pipelines import Pipeline, resolve
from difflab.pipelines.cascade import CascadePipeline
from difflab.pipelines.folder import shipped_root

RESULTS = Path(__file__).resolve().parent / "results"
SATURATED = 0.98  # |pixel| at least this, in [-1, 1], counts as saturated
VARIANTS = {"none": "-none", "noise": "", "truncated": "-truncated"}
DATASETS = {
    "digits": {"base": "digits-cfg", "stage": "digits-sr32", "direct": "digits32-direct",
               "stage_recipe": "configs/digits-sr32.toml", "direct_recipe": "configs/digits32-direct.toml"},
    "shapes": {"base": "shapes-text", "stage": "shapes-sr64", "direct": "shapes64-direct",
               "stage_recipe": "configs/shapes-sr64.toml", "direct_recipe": "configs/shapes64-direct.toml"},
}  # fmt: skip


def say(text: str) -> None:
    print(text, flush=True)


def saturated_share(x: torch.Tensor) -> float:
    return float((x.clamp(-1, 1).abs() >= SATURATED).double().mean())


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def training_seconds(model) -> float | None:
    record = resolve(model) / "training.json"
    if not record.is_file():
        return None
    seconds = json.loads(record.read_text()).get("wall_seconds")
    return float(seconds) if seconds is not None else None


# ---------------------------------------------------------------- judges
class Judge:
    """The conditions to sample (labels or prompts), the real images they describe, and the
    scores of samples: accuracy, FD (digits FD or attribute FD) and the saturated share."""

    def __init__(self, dataset: str, n: int, size: int):
        self.dataset, self.n, self.size = dataset, n, size
        if dataset == "digits":
            from difflab.data.digits import DigitsDataset
            from difflab.eval.metrics import classifier_outputs, digits_metrics
            from difflab.eval.report import digits_reference

            self.classifier, test, _ = digits_reference(size)
            self.labels = torch.arange(n) % 10
            self.options = {"label": self.labels.tolist()}
            real = DigitsDataset("test", size=size)
            count = min(n, len(real))
            self.real, self.real_options = real.images[:count], {"label": real.labels[:count].tolist()}
            self._outputs, self._metrics, self._test = classifier_outputs, digits_metrics, test
        else:
            from difflab.eval.shapes import ShapesJudge
            from difflab.train.tasks import load_classifier

            classifier, _ = load_classifier(shipped_root() / "shapes-judge")
            self.shapes = ShapesJudge.for_test_scenes(classifier, n, size)
            self.options = {"prompt": self.shapes.prompts}
            self.real, self.real_options = self.shapes.real, self.options

    def __call__(self, x: torch.Tensor) -> dict:
        x = x.clamp(-1, 1)
        if self.dataset == "digits":
            m = self._metrics(x, self.classifier, self._test)
            _, probs = self._outputs(self.classifier, x)
            accuracy, fd = float((probs.argmax(1) == self.labels[: len(x)]).double().mean()), m["digits_fd"]
        else:
            scores = self.shapes(x)
            accuracy, fd = scores["accuracy"], scores["attribute_fd"]
        return {"accuracy": accuracy, "fd": fd, "saturated": saturated_share(x)}

    def floor(self) -> dict:
        """What real images score (the judge on the real images the conditions describe)."""
        if self.dataset == "digits":
            from difflab.data.digits import DigitsDataset

            train = DigitsDataset("train", size=self.size)
            x = train.images[: self.n]
            m = self._metrics(x, self.classifier, self._test)
            _, probs = self._outputs(self.classifier, x)
            accuracy = float((probs.argmax(1) == train.labels[: self.n]).double().mean())
            return {"accuracy": accuracy, "fd": m["digits_fd"], "saturated": saturated_share(self.real)}
        floor = self.shapes.real_floor()
        return {"accuracy": floor["accuracy"], "fd": floor["attribute_fd"], "saturated": saturated_share(self.real)}


# ---------------------------------------------------------------- sections
def sample(pipe, n: int, args, **options) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    common = {"steps": args.steps} if args.steps else {}
    x = pipe.generate(n, seed=args.seed, batch_size=args.batch_size, **common, **options)
    return x, time.perf_counter() - started


def equal_time(name: str, models: dict, judge: Judge, args) -> tuple[dict, list[torch.Tensor]]:
    cascade = CascadePipeline.from_stages([models["base"], models["noise"]], device="cpu")
    started = time.perf_counter()
    common = {"steps": args.steps} if args.steps else {}
    low, high = cascade.generate_stages(judge.n, seed=args.seed, batch_size=args.batch_size, **common, **judge.options)
    seconds = time.perf_counter() - started
    base_s, stage_s = training_seconds(models["base"]), training_seconds(models["noise"])
    base_source = "the base's training.json"
    if name in args.base_seconds:  # the base's time re-measured on this machine (its record may be another's)
        base_s, base_source = args.base_seconds[name], "--base-seconds"
    row = {"cascade": {**judge(high), "sampling_seconds": seconds, "settings": cascade.call_settings(**common),
                       "training_seconds": None if None in (base_s, stage_s) else base_s + stage_s,
                       "base_training_seconds": base_s, "base_training_seconds_from": base_source,
                       "stage_training_seconds": stage_s}}  # fmt: skip
    pictures = [upsample(low[:8].clamp(-1, 1), high.shape[-1], "nearest"), high[:8]]
    if "direct" in models:
        direct = Pipeline.from_pretrained(models["direct"], device="cpu")
        x, seconds = sample(direct, judge.n, args, **judge.options)
        row["direct"] = {**judge(x), "sampling_seconds": seconds, "settings": direct.settings(steps=args.steps),
                         "training_seconds": training_seconds(models["direct"])}  # fmt: skip
        pictures.append(x[:8])
        c, d = row["cascade"], row["direct"]
        known = c["training_seconds"] and d["training_seconds"]
        ratio = c["training_seconds"] / d["training_seconds"] if known else None
        row["comparison"] = {
            "training_time_ratio": ratio,
            "about_equal_time": ratio is not None and abs(ratio - 1) <= 0.15,
            "cascade_better_fd": c["fd"] < d["fd"],
            "cascade_better_accuracy": c["accuracy"] > d["accuracy"],
        }
        row["goal_met"] = row["comparison"]["cascade_better_fd"] and row["comparison"]["cascade_better_accuracy"]
    say(f"{name} equal time: " + json.dumps({k: {m: v[m] for m in ("fd", "accuracy")} for k, v in row.items()
                                               if k in ("cascade", "direct")}))  # fmt: skip
    return row, pictures


def ablation(name: str, models: dict, judge: Judge, args) -> dict:
    """Each trained variant swept over s; the base's clean samples drawn once for the untruncated ones."""
    base = Pipeline.from_pretrained(models["base"], device="cpu")
    low, _ = sample(base, judge.n, args, **judge.options)
    common = {"steps": args.steps} if args.steps else {}
    out = {}
    for variant in VARIANTS:
        if variant not in models:
            continue
        cascade = CascadePipeline.from_stages([models["base"], models[variant]], device="cpu")
        levels = [0.0] if variant == "none" else list(args.levels)
        if variant == "truncated":
            T = base.denoiser.schedule.T
            levels = [s for s in levels if abs(s * T - round(s * T)) < 1e-6]
        rows = {}
        for s in levels:
            started = time.perf_counter()
            given = {"low_res": low} if variant != "truncated" else {}
            xs = cascade.generate_stages(judge.n, seed=args.seed, batch_size=args.batch_size,
                                         stages={1: {"aug_level": s}}, **given, **common, **judge.options)  # fmt: skip
            rows[str(s)] = {**judge(xs[-1]), "sampling_seconds": time.perf_counter() - started}
            say(f"{name} {variant} s={s:g}: fd {rows[str(s)]['fd']:.2f}, accuracy {rows[str(s)]['accuracy']:.3f}")
        out[variant] = {"run": str(models[variant]), "levels": rows}
    augmented = [(v, s, r["fd"]) for v in ("noise", "truncated") if v in out for s, r in out[v]["levels"].items()]
    if augmented:
        variant, level, best = min(augmented, key=lambda row: row[2])
        if "none" in out:
            reference, what = out["none"]["levels"]["0.0"]["fd"], "the stage trained without augmentation"
        elif "0.0" in out.get("noise", {}).get("levels", {}):
            reference, what = out["noise"]["levels"]["0.0"]["fd"], "the noise-augmented stage at s = 0 (no none run)"
        else:
            reference, what = None, None
        out["best_augmented"] = {"variant": variant, "aug_level": float(level), "fd": best}
        if reference is not None:
            out["unaugmented"] = {"fd": reference, "what": what}
            out["fd_ratio"] = best / reference
            out["goal_met"] = best <= 0.8 * reference
    return out


def consistency(name: str, models: dict, judge: Judge, args) -> dict:
    """downsample(SR(x_low)) against x_low for real images, against the down-up round trip."""
    stage = Pipeline.from_pretrained(models["noise"], device="cpu")
    sr = stage.manifest["superres"]
    real = judge.real
    x_low = downsample(real, sr["low_size"])
    round_trip = rmse(downsample(upsample(x_low, real.shape[-1], sr["upsample"]), sr["low_size"]), x_low)
    cascade = CascadePipeline.from_stages([models["base"], models["noise"]], device="cpu")
    common = {"steps": args.steps} if args.steps else {}
    out = {"round_trip_rmse": round_trip, "levels": {}}
    for s in sorted({0.0, float(sr["aug_level"])}):
        _, x = cascade.generate_stages(len(real), seed=args.seed, batch_size=args.batch_size, low_res=x_low,
                                       stages={1: {"aug_level": s}}, **common, **judge.real_options)  # fmt: skip
        error = rmse(downsample(x.clamp(-1, 1), sr["low_size"]), x_low)
        out["levels"][str(s)] = {"rmse": error, "ratio_to_round_trip": error / max(round_trip, 1e-12)}
    default = out["levels"][str(float(sr["aug_level"]))]
    out["goal_met"] = default["ratio_to_round_trip"] <= 2.0
    say(f"{name} consistency: round trip {round_trip:.4f}, " + ", ".join(
        f"s={s}: {r['rmse']:.4f} ({r['ratio_to_round_trip']:.2f}x)" for s, r in out["levels"].items()))  # fmt: skip
    return out


def guidance(name: str, models: dict, judge: Judge, args) -> dict:
    """The base's w with static or dynamic thresholding on every stage."""
    cascade = CascadePipeline.from_stages([models["base"], models["noise"]], device="cpu")
    common = {"steps": args.steps} if args.steps else {}
    out: dict = {"real_saturated": saturated_share(judge.real), "weights": {}}
    for w in args.ws:
        row = {}
        for kind in ("static", "dynamic"):
            stages = {0: {"guidance": w, "thresholding": kind}, 1: {"thresholding": kind}}
            low, high = cascade.generate_stages(judge.n, seed=args.seed, batch_size=args.batch_size, stages=stages,
                                                **common, **judge.options)  # fmt: skip
            row[kind] = {**judge(high), "base_saturated": saturated_share(low)}
        static, dynamic = row["static"], row["dynamic"]
        row["saturated_ratio"] = dynamic["saturated"] / static["saturated"] if static["saturated"] > 0 else math.nan
        row["accuracy_change"] = dynamic["accuracy"] - static["accuracy"]
        out["weights"][str(w)] = row
        say(f"{name} w={w:g}: saturated static {static['saturated']:.3f} dynamic {dynamic['saturated']:.3f}, "
            f"accuracy static {static['accuracy']:.3f} dynamic {dynamic['accuracy']:.3f}")  # fmt: skip
    high_w = [r for w, r in out["weights"].items() if float(w) >= 5]
    if high_w:
        out["goal_met"] = all(r["saturated_ratio"] <= 0.5 and r["accuracy_change"] >= -0.02 for r in high_w)
    return out


SECTIONS = {"ablation": ablation, "consistency": consistency, "guidance": guidance, "equal_time": equal_time}


# ---------------------------------------------------------------- plot
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in DATASETS if isinstance(result.get(n), dict) and "equal_time" in result[n]]
    fig, axes = plt.subplots(max(1, len(names)), 3, figsize=(15, 4 * max(1, len(names))), squeeze=False)
    for row, name in zip(axes, names):
        r = result[name]
        eq = r["equal_time"]
        kinds = [k for k in ("cascade", "direct") if k in eq]
        ax = row[0]
        ax.bar(kinds, [eq[k]["fd"] for k in kinds], color=["tab:blue", "tab:orange"][: len(kinds)])
        for i, k in enumerate(kinds):
            hours = eq[k].get("training_seconds")
            text = f"acc {eq[k]['accuracy']:.0%}" + (f"\n{hours / 3600:.1f} h" if hours else "")
            ax.annotate(text, (i, eq[k]["fd"]), ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, 1.3 * max(eq[k]["fd"] for k in kinds))
        ax.set(title=f"{name}: equal training time", ylabel="FD (lower is better)")
        ax = row[1]
        for variant, data in r.get("ablation", {}).items():
            if isinstance(data, dict) and "levels" in data:
                levels = sorted(data["levels"], key=float)
                ax.plot([float(s) for s in levels], [data["levels"][s]["fd"] for s in levels], "o-", label=variant)
        ax.set(title=f"{name}: augmentation and the level s at sampling", xlabel="s", ylabel="FD")
        ax.legend(fontsize=8)
        ax = row[2]
        g = r.get("guidance", {}).get("weights", {})
        ws = sorted(g, key=float)
        for kind, style in (("static", "o-"), ("dynamic", "s--")):
            ax.plot([float(w) for w in ws], [g[w][kind]["saturated"] for w in ws], style, label=f"{kind}: saturated")
        if "real_saturated" in r.get("guidance", {}):
            ax.axhline(r["guidance"]["real_saturated"], color="k", lw=0.8, label="real images")
        twin = ax.twinx()
        for kind, style in (("static", "o:"), ("dynamic", "s:")):
            twin.plot([float(w) for w in ws], [g[w][kind]["accuracy"] for w in ws], style, color="tab:green",
                      label=f"{kind}: accuracy")  # fmt: skip
        ax.set(title=f"{name}: guidance w and thresholding", xlabel="w", ylabel="saturated share")
        twin.set_ylabel("accuracy")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def find_models(name: str, args) -> tuple[dict, list[dict]]:
    """The models of one dataset that exist, and what is skipped (with how to make it)."""
    spec = DATASETS[name]
    base = getattr(args, f"{name}_base") or spec["base"]
    models, skipped = {"base": base}, []
    for variant, suffix in VARIANTS.items():
        run = args.runs / f"{spec['stage']}{suffix}"
        if (run / "model" / "diffusion.json").is_file() or (run / "diffusion.json").is_file():
            models[variant] = run
        else:
            extra = {"none": " --set superres.augmentation=none",
                     "truncated": " --set superres.augmentation=truncated"}.get(variant, "")  # fmt: skip
            skipped.append({"run": str(run), "train": f"difflab train {spec['stage_recipe']} --out {run}{extra}"})
    direct = args.runs / spec["direct"]
    if (direct / "model" / "diffusion.json").is_file():
        models["direct"] = direct
    else:
        skipped.append({"run": str(direct), "train": f"difflab train {spec['direct_recipe']} --out {direct}"})
    return models, skipped


def parse_base_seconds(parser, items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = math.nan
        if name not in DATASETS or not value > 0:
            parser.error(f"--base-seconds {item!r}: expected DATASET=SECONDS with DATASET one of "
                         f"{', '.join(DATASETS)} and SECONDS a positive number")  # fmt: skip
        out[name] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs"), help="the folder holding the runs (default runs/)")
    p.add_argument("--only", choices=tuple(DATASETS), help="measure one dataset")
    p.add_argument("--digits-base", help="the digits base (default the shipped digits-cfg)")
    p.add_argument("--shapes-base", help="the shapes base (default the shipped shapes-text)")
    p.add_argument("--base-seconds", nargs="+", default=[], metavar="DATASET=SECONDS",
                   help="the base's training time measured on this machine (e.g. digits=3300: its steps times its "
                        "seconds per step here), instead of the one its training.json recorded elsewhere")  # fmt: skip
    p.add_argument("--n-digits", type=int, default=300, help="samples per digits setting")
    p.add_argument("--n-shapes", type=int, default=100, help="samples (test prompts) per shapes setting")
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--ws", type=float, nargs="+", default=[1.0, 3.0, 5.0, 8.0], help="the base's guidance weights")
    p.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), default=list(SECTIONS),
                   help="measure only these (the JSON at --out keeps the others)")
    p.add_argument("--steps", type=int, help="steps of every stage (default: each model's own)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 samples, 3 steps, two levels, w 1 and 5")
    p.add_argument("--out", type=Path, help="JSON path (default results/cascade.json, or cascade-quick.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.base_seconds = parse_base_seconds(p, args.base_seconds)
    if args.quick:
        args.n_digits = args.n_shapes = 8
        args.steps, args.levels, args.ws = 3, [0.0, 0.2], [1.0, 5.0]
    out = args.out or RESULTS / ("cascade-quick.json" if args.quick else "cascade.json")
    partial = args.only or set(args.sections) != set(SECTIONS)
    earlier = json.loads(out.read_text()) if partial and out.is_file() else {}
    found = {name: find_models(name, args) for name in DATASETS}  # "skipped": what is missing now, every dataset
    result: dict = {
        **earlier,  # --only, --sections: the other dataset and sections of the same JSON are kept
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads",
        "saturated_threshold": SATURATED,
        "skipped": [item for _, skipped in found.values() for item in skipped],
    }
    samples: dict[str, list[torch.Tensor]] = {}
    for name in [args.only] if args.only else list(DATASETS):
        models, skipped = found[name]
        if "noise" not in models:
            say(f"{name}: skipped (no {DATASETS[name]['stage']} run); train it with: {skipped[0]['train']}")
            result[name] = {"skipped": "no super-resolution stage run"}
            continue
        size = Pipeline.from_pretrained(models["noise"], device="cpu").output_shape[-1]
        judge = Judge(name, args.n_digits if name == "digits" else args.n_shapes, size)
        section = result[name] if isinstance(result.get(name), dict) and "models" in result[name] else {}
        section.update(models={k: str(v) for k, v in models.items()}, image_size=size, real_floor=judge.floor())
        result[name] = section
        out.parent.mkdir(parents=True, exist_ok=True)
        for key in SECTIONS:  # equal time last: its direct run is the longest to sample
            if key not in args.sections:
                continue
            measured = SECTIONS[key](name, models, judge, args)
            if key == "equal_time":
                measured, pictures = measured
                samples[name] = [pic.clamp(-1, 1) if pic.shape[1] == 3 else pic.clamp(-1, 1).expand(-1, 3, -1, -1)
                            for pic in pictures]  # fmt: skip
            measured["measured_with"] = {"n": judge.n, "steps": args.steps, "seed": args.seed, "threads": args.threads}
            section[key] = measured
            out.write_text(json.dumps(result, indent=2) + "\n")  # after each section: a partial result survives
    for item in result["skipped"]:
        say(f"skipped {item['run']}: {item['train']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    wrote = [str(out), str(out.with_suffix(".png"))]
    for name, pictures in samples.items():  # one picture per dataset: a later --only run keeps the other's
        size = max(x.shape[-1] for x in pictures)
        rows = [torch.nn.functional.interpolate(x, size=(size, size), mode="nearest") for x in pictures]
        path = out.with_name(f"{out.stem}-samples-{name}.png")
        save_grid(torch.cat(rows), path, nrow=8)
        wrote.append(str(path))
    say(f"wrote {', '.join(wrote)}")


if __name__ == "__main__":
    main()
