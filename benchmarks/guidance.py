"""Guidance benchmark: how the guidance weight w trades sample fidelity for agreement with the
condition, for class-conditional digits and text-conditional shapes.

For every w in {0, 0.5, 1, 2, 4, 8} (classifier-free guidance; w = 0 is the plain conditional
model) the same seeds are sampled and judged:
  - digits: conditional accuracy (the shipped digits classifier's arg-max equals the requested
    label), confident share, and digits FD against the 297 real test digits;
  - shapes (a pixel or a latent text-to-image model, judged on its decoded 64x64 or 32x32
    images): conditional accuracy (the attribute classifier reads back every attribute of the
    prompt: shape, colour, size and position), per-attribute accuracies, and the Frechet distance
    in the attribute classifier's feature space against real test scenes. Prompts are the
    captions of the first n test scenes, so the real images are a matched reference.
Each section also reports the real-data floor: the judge on real images of the same count.
Optionally (--noisy-classifier and --uncond-model) classifier guidance of an unconditional
digits model is swept over the same w (Dhariwal & Nichol's Algorithm 2).

    python benchmarks/guidance.py --digits-model runs/digits-cfg --shapes-model runs/shapes-text \\
        --attribute-classifier runs/shapes-attributes [--noisy-classifier runs/digits-noisy-classifier \\
        --uncond-model runs/digits-ddpm] [--n 300] [--steps 50]
    python benchmarks/guidance.py ... --quick      # smoke run: 16 samples, 4 steps

Writes benchmarks/results/guidance.json and guidance.png (accuracy against FD, one point per w);
a call with only one of the models replaces that section and keeps the other.
Models come from configs/digits-cfg.toml, shapes-text.toml, shapes-attributes.toml and
digits-noisy-classifier.toml.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from difflab.eval.metrics import classifier_outputs, digits_metrics
from difflab.eval.report import digits_reference, sample_batched
from difflab.eval.shapes import ShapesJudge
from difflab.guidance import ClassifierGuidance, as_saved, conditioned
from difflab.schedules import Schedule
from difflab.train import load_decoder, load_pipeline
from difflab.train.tasks import load_classifier

RESULTS = Path(__file__).resolve().parent / "results"
SCALES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


def sweep(name: str, make, judge, n: int, args, decode=None) -> dict:
    """For each w: (denoiser, cond) = make(w), n samples with per-example seeds (decoded to pixels
    for a latent model), then judge."""
    out = {}
    for w in SCALES:
        denoiser, cond = make(w)
        start = time.perf_counter()
        x = sample_batched(denoiser, n, args.sampler, args.steps, args.seed, cond=cond, batch_size=args.batch_size,
                           decode=decode)  # fmt: skip
        x = x.clamp(-1, 1)  # judged as saved pictures are (strong guidance overshoots [-1, 1])
        metrics = {**judge(x), "sampling_seconds": time.perf_counter() - start}
        out[str(w)] = metrics
        print(f"{name} w={w:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)),
              flush=True)  # fmt: skip
    return out


# ---------------------------------------------------------------- digits
def digits_judge(size: int, labels: torch.Tensor):
    """judge(x, y=labels): accuracy against the labels asked for, digits FD, confident share."""
    classifier, test, _ = digits_reference(size)

    def judge(x: torch.Tensor, y: torch.Tensor = labels) -> dict:
        m = digits_metrics(x, classifier, test)
        _, probs = classifier_outputs(classifier, x)
        return {
            "accuracy": float((probs.argmax(1) == y).double().mean()),
            "digits_fd": m["digits_fd"],
            "confident_share": m["confident_share"],
        }

    return judge


def digits_section(args, n: int) -> dict:
    from difflab.data.digits import DigitsDataset

    denoiser, meta = load_pipeline(args.digits_model)
    if not meta.get("num_classes"):
        raise ValueError(f"{args.digits_model} is not class-conditional; train configs/digits-cfg.toml")
    size = denoiser.sample_shape[-1]
    labels = torch.arange(n) % meta["num_classes"]
    judge = digits_judge(size, labels)
    train = DigitsDataset("train", size=size)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: min(n, len(train))]
    floor = judge(train.images[pick], train.labels[pick])  # n real train digits: what a perfect model scores
    result = {"model": str(args.digits_model), "real_floor": floor}
    result["cfg"] = sweep("digits cfg", lambda w: conditioned(denoiser, meta, n, scale=w), judge, n, args)
    if args.noisy_classifier and args.uncond_model:
        result["classifier_guidance"] = classifier_guidance_section(args, n, labels, judge)
    return result


def classifier_guidance_section(args, n: int, labels: torch.Tensor, judge) -> dict:
    uncond, meta = load_pipeline(args.uncond_model)
    classifier, cmeta = load_classifier(args.noisy_classifier)
    trained_on = Schedule.make(cmeta["schedule"], cmeta["T"], zero_terminal_snr=cmeta["zero_terminal_snr"])
    if trained_on.to_config() != meta["schedule"]:
        raise ValueError(f"the classifier was trained on {trained_on.to_config()}, the model on {meta['schedule']}: "
                         "t would mean different noise levels")  # fmt: skip

    def make(w):  # clipped outermost, as the model was meant to be sampled (its diffusion.json)
        return as_saved(ClassifierGuidance(uncond, classifier, w, strip_labels=True), meta), {"y": labels}

    out = sweep("digits classifier guidance", make, judge, n, args)
    return {"model": str(args.uncond_model), "classifier": str(args.noisy_classifier), "scales": out}


# ---------------------------------------------------------------- shapes
def shapes_section(args, n: int) -> dict:
    denoiser, meta = load_pipeline(args.shapes_model)
    if meta.get("conditioning") != "text":
        raise ValueError(f"{args.shapes_model} is not text-conditional; train configs/shapes-text.toml")
    classifier, _ = load_classifier(args.attribute_classifier)
    latent = meta.get("latent")
    size = latent["image_shape"][-1] if latent else denoiser.sample_shape[-1]
    judge = ShapesJudge.for_test_scenes(classifier, n, size)
    return {
        "model": str(args.shapes_model),
        "space": "latent" if latent else "pixels",
        "image_size": size,
        "attribute_classifier": str(args.attribute_classifier),
        "real_floor": judge.real_floor(),
        "cfg": sweep("shapes cfg", lambda w: conditioned(denoiser, meta, n, scale=w, prompt=judge.prompts), judge,
                     n, args, decode=load_decoder(args.shapes_model)),  # fmt: skip
    }


# ---------------------------------------------------------------- plot
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    if "digits" in result:
        curves.append(("digits: CFG", result["digits"]["cfg"], "digits_fd", result["digits"]["real_floor"]))
        if "classifier_guidance" in result["digits"]:
            cg = result["digits"]["classifier_guidance"]["scales"]
            curves.append(("digits: classifier guidance", cg, "digits_fd", None))
    if "shapes" in result:
        curves.append(("shapes: CFG", result["shapes"]["cfg"], "attribute_fd", result["shapes"]["real_floor"]))
    panels = sorted({c[2] for c in curves})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for label, scales, fd_key, floor in (c for c in curves if c[2] == key):
            ws = list(scales)
            xs, ys = [scales[w][fd_key] for w in ws], [scales[w]["accuracy"] for w in ws]
            ax.plot(xs, ys, "o-", label=label)
            for w, x, y in zip(ws, xs, ys):
                ax.annotate(f"w={float(w):g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if floor is not None:
                ax.plot([floor[fd_key]], [floor["accuracy"]], "k*", markersize=10, label=f"{label.split(':')[0]}: real")
        ax.set(xlabel=f"{key} (lower is better)", ylabel="conditional accuracy", title=key.replace("_", " "))
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits-model", type=Path, help="class-conditional digits run (configs/digits-cfg.toml)")
    p.add_argument("--shapes-model", type=Path, help="text-conditional shapes run (configs/shapes-text.toml)")
    p.add_argument("--attribute-classifier", type=Path, help="configs/shapes-attributes.toml run")
    p.add_argument("--noisy-classifier", type=Path, help="configs/digits-noisy-classifier.toml run (optional)")
    p.add_argument("--uncond-model", type=Path, help="unconditional digits run for classifier guidance (optional)")
    p.add_argument("--n", type=int, default=300, help="samples per guidance weight")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 16 samples, 4 steps")
    p.add_argument("--out", type=Path, help="JSON path (default results/guidance.json, or guidance-quick.json)")
    args = p.parse_args()
    if args.digits_model is None and args.shapes_model is None:
        p.error("give --digits-model and/or --shapes-model")
    if args.shapes_model is not None and args.attribute_classifier is None:
        p.error("--shapes-model needs --attribute-classifier (the judge)")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.steps = 16, 4
    out = args.out or RESULTS / ("guidance-quick.json" if args.quick else "guidance.json")

    # sections not measured in this call are kept from an earlier one (each has its settings)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["note"] = "w is the CFG weight: eps = (w + 1) eps(x, c) - w eps(x, null) (diffusers' guidance_scale = w + 1)"
    settings = {
        "n": args.n, "sampler": args.sampler, "steps": args.steps, "seed": args.seed, "scales": list(SCALES),
        "quick": args.quick, "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads",
    }  # fmt: skip
    if args.digits_model is not None:
        result["digits"] = {"settings": settings, **digits_section(args, args.n)}
    if args.shapes_model is not None:
        result["shapes"] = {"settings": settings, **shapes_section(args, args.n)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
