"""ControlNet benchmark: do samples follow their control image, and does the caption still work?

For the first n test images of the data the model was trained on (shapes: the test scenes), the
control is computed as in training (`difflab.data.controls`; shapes masks from the renderer).
The controlled model and the same base without control (the copy of the locked base inside the
model folder, sampled alone) draw one sample per control, from the same seeds:

- without a caption (text models: the null caption ""; no guidance): the control alone must
  carry the layout;
- with the test image's own caption (text models, CFG weight --guidance) or its label (class
  models): the caption's attributes must still be drawn, scored by the shipped attribute judge
  (every attribute right) where the data is 32x32 shapes.

Scores per sample: mask IoU between the control mask (for edge controls: the foreground of the
test image) and the sample's foreground (pixels at least 1 away from the black background in
some channel, `difflab.data.controls.foreground`), and edge F1 with a 1-pixel tolerance between
the control's edges (edge controls: the control itself; masks: the Canny edges of the mask) and
the sample's edges of the same kind. Goals (shapes-control): IoU >= 0.8 controlled without a
caption against about 0.1 uncontrolled; attributes right >= 80% with a caption.

"Sudden convergence": the step where the run's logged control measure (control_iou or
control_f1, see `difflab.train.tasks.control`) first reaches and holds (3 log lines) the halfway
point between its first value and its plateau (the mean of the last fifth of the log).

    python benchmarks/control.py runs/shapes-control [--n 100] [--guidance 3] [--steps 25]

Writes benchmarks/results/control.json and control.png (per row: control | controlled sample
without caption | with caption | uncontrolled without caption | with caption).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from difflab.data import get_dataset
from difflab.data.controls import HintDataset, canny_edges, foreground, hint_picture, make_hint
from difflab.data.images import save_grid
from difflab.denoiser import build_denoiser
from difflab.eval.control import edge_f1, mask_iou
from difflab.pipelines import Pipeline, resolve
from difflab.train.monitor import read_log

RESULTS = Path(__file__).resolve().parent / "results"
JUDGE = "shapes-judge"
HOLD = 3  # log lines the control measure must stay above its halfway point


def print_row(name: str, row: dict) -> None:
    values = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
    print(f"{name}: {values}", flush=True)


def test_controls(manifest: dict, n: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(real test images, their controls, their items) for the model's data and control kind."""
    data = dict(manifest["data"])
    name = data.pop("name")
    options = {k: v for k, v in data.items() if k not in ("split", "n")}
    if name == "shapes":
        options["n"] = max(n, 2)
    dataset = HintDataset(get_dataset(name, "test", **options), manifest["control"]["hint"])
    if len(dataset) < n:
        raise ValueError(f"the {name} test split has {len(dataset)} images; asked for --n {n}")
    items = [dataset[i] for i in range(n)]
    return torch.stack([it["x"] for it in items]), torch.stack([it["hint"] for it in items]), items


def targets(kind: str, hints: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, edges) a sample should match: the control mask and its Canny edges, or, for an
    edge control, the test image's foreground and the control itself."""
    if kind == "mask":
        return hints, canny_edges(hint_picture(hints, 1))
    return foreground(real), hints


def scores(kind: str, x: torch.Tensor, mask: torch.Tensor, edges: torch.Tensor) -> dict:
    sample_edges = canny_edges(x) if kind in ("mask", "canny") else make_hint(kind, x)
    iou, f1 = mask_iou(foreground(x), mask), edge_f1(sample_edges, edges, tolerance=1)
    return {"mask_iou": float(iou.mean()), "mask_iou_min": float(iou.min()), "edge_f1": float(f1.mean())}


def uncontrolled(pipe: Pipeline) -> Pipeline:
    """The same locked base without its control branch, sampled with the same settings."""
    m = {k: v for k, v in pipe.manifest.items() if k != "control"}
    m["components"] = {"denoiser": "."}
    d = pipe.denoiser
    base = build_denoiser(pipe.network.base, d.schedule, d.prediction, d.variance, d.sample_shape,
                          **(m.get("denoiser_options") or {}))  # fmt: skip
    return Pipeline(base, m)


def conditions(pipe: Pipeline, items: list[dict], guidance: float) -> dict[str, dict]:
    """name -> generate() options: the conditions each model is sampled under."""
    n = len(items)
    kind = pipe.conditioning
    if kind == "text":
        return {
            "no_caption": {"prompt": [""] * n, "guidance": 0.0},
            "caption": {"prompt": [it["caption"] for it in items], "guidance": guidance},
        }
    if kind == "class":
        return {"label": {"label": [int(it["y"]) for it in items], "guidance": guidance}}
    return {"unconditional": {}}


def sudden_convergence(run: Path) -> dict | None:
    """The step where the logged control measure first reaches and holds its halfway point."""
    records = read_log(run)
    key = next((k for k in ("control_iou", "control_f1") if records and k in records[0]), None)
    if key is None:
        return None
    curve = [(r["step"], r[key]) for r in records if key in r]
    values = [v for _, v in curve]
    tail = values[-max(1, len(values) // 5) :]
    start, plateau = values[0], sum(tail) / len(tail)
    halfway = start + 0.5 * (plateau - start)
    step = None
    if plateau > start:
        for i in range(len(values)):
            if all(v >= halfway for v in values[i : i + HOLD]):
                step = curve[i][0]
                break
    return {"key": key, "start": start, "plateau": plateau, "halfway": halfway, "step": step,
            "curve": [[s, v] for s, v in curve]}  # fmt: skip


def judge_for(pipe: Pipeline, prompts: list[str], real: torch.Tensor):
    """The shipped attribute judge for 32x32 (or multiples) shapes models, else None."""
    if pipe.manifest["data"].get("name") != "shapes" or real.shape[-1] % 32:
        return None
    from difflab.eval.shapes import ShapesJudge
    from difflab.pipelines.folder import shipped_root
    from difflab.train.tasks import load_classifier

    classifier, _ = load_classifier(shipped_root() / JUDGE)
    return ShapesJudge(classifier, prompts, real)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="a control run folder (or its model folder)")
    p.add_argument("--n", type=int, default=100, help="test images / controls")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG weight w with a caption or label")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--strength", type=float, default=None, help="control strength (default: the model's)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "control.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    folder = resolve(args.model)
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    spec = pipe.manifest.get("control")
    if spec is None:
        raise SystemExit(f"{folder} is not a ControlNet model (its manifest has no control)")
    real, hints, items = test_controls(pipe.manifest, args.n)
    mask, edges = targets(spec["hint"], hints, real)
    base = uncontrolled(pipe)
    judge = judge_for(pipe, [it.get("caption", "") for it in items], real)
    common = {"steps": args.steps, "sampler": args.sampler, "seed": args.seed, "batch_size": args.batch_size}
    rows, pictures = {}, {}
    for model_name, model in (("controlled", pipe), ("uncontrolled", base)):
        for cond_name, options in conditions(pipe, items, args.guidance).items():
            if model is pipe:
                options = {**options, "control": hints, "control_strength": args.strength}
            started = time.perf_counter()
            x = model.generate(args.n, **common, **options).clamp(-1, 1)
            row = {**scores(spec["hint"], x, mask, edges), "seconds": time.perf_counter() - started}
            if judge is not None and cond_name == "caption":
                row.update({f"judge_{k}": v for k, v in judge(x).items()})
            rows.setdefault(model_name, {})[cond_name] = row
            pictures[model_name, cond_name] = x
            print_row(f"{model_name}, {cond_name}", row)

    run = folder.parent if folder.name == "model" else folder
    result = {
        "model": str(folder),
        "control": spec,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads",
        "scores": rows,
        "sudden_convergence": sudden_convergence(run),
    }
    if "no_caption" in rows["controlled"]:
        c, u = rows["controlled"]["no_caption"], rows["uncontrolled"]["no_caption"]
        result["goals"] = {"iou_controlled": c["mask_iou"], "iou_uncontrolled": u["mask_iou"],
                           "iou_goal_met": c["mask_iou"] >= 0.8}  # fmt: skip
        if judge is not None:
            accuracy = rows["controlled"]["caption"]["judge_accuracy"]
            result["goals"].update(attributes_with_caption=accuracy, attributes_goal_met=accuracy >= 0.8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    shown = min(8, args.n)
    columns = [hint_picture(hints[:shown], real.shape[1])] + [x[:shown] for x in pictures.values()]
    grid = torch.stack(columns, dim=1).flatten(0, 1)
    save_grid(grid, args.out.with_suffix(".png"), nrow=len(columns))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    if result["sudden_convergence"]:
        s = result["sudden_convergence"]
        print(f"control appears at step {s['step']} ({s['key']} {s['start']:.3f} -> {s['plateau']:.3f})")


if __name__ == "__main__":
    main()
