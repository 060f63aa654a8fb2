"""Likelihood and sample quality of the improved-DDPM objectives and of NCSN, on digits.

    python benchmarks/likelihood.py [--simple digits-ddpm] [--hybrid runs/digits-hybrid]
                                    [--vlb runs/digits-vlb] [--ncsn runs/digits-ncsn]
                                    [--images 128] [--seeds 0 1 2] [--n 500] [--only NAME ...]
                                    [--merge RESULT ...]

For each of the L_simple, L_hybrid and L_vlb models (configs/digits-ddpm.toml, digits-hybrid.toml,
digits-vlb.toml: one network, three objectives): bits/dim of the first `--images` test digits
re-quantised to 8 bits, by the variational bound of the model as it samples (x0 thresholded as
its manifest says, as Ho et al.'s and improved DDPM's bound code clip it) and exactly through the
bare network's probability-flow ODE (one value per seed: dequantisation, Hutchinson probe and
forward noise), and digits FD /
confident share of `--n` samples (DDIM-50, and for the learned-variance models ancestral DDPM on
`--ddpm-steps` respaced steps, which learned variances are for). For the NCSN recipe
(digits-ncsn.toml): FD with annealed Langevin (`--langevin-levels` levels x 20 steps) and with
predictor-corrector (`--pc-steps` x (1 + 1 corrector)), equal NFE, against the DDPM of the same
network (the simple model's DDIM-50). A missing run is skipped and reported.

Cost on one CPU thread (the digits U-Net, about 0.4 s per forward of 64): the bound is T = 1000
forwards per batch and seed, the ODE (RK45 at rtol = atol = 1e-4: about 400 evaluations, each a
forward and a backward) about the same: half an hour per model for 128 images and 3 seeds,
plus sampling. 128 images keep the spread over seeds (dequantisation, probe, forward noise) of
the ODE below 0.02 bits/dim; at 32 it was 0.05. --tol 1e-5 doubles the evaluations and moved
the simple model's value by 0.003 bits/dim on 8 digits. `--only NAME ...` measures those models
and keeps the others' rows from --out (same images, seeds, tolerance and n, else it refuses), so
the models can run as parallel processes (`--only hybrid --out hybrid.json`, ...) whose results
`--merge simple.json hybrid.json ...` then joins into one.

Writes benchmarks/results/likelihood.json. Goals (improved DDPM; score SDE): hybrid < simple in
bits/dim by the bound with its FD within 1.2x of simple's; the ODE <= 0.95x the bound of the
same model; the spread over seeds < 0.02 bits/dim.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from difflab.eval.likelihood import eight_bit_test_digits, model_bits_per_dim
from difflab.eval.report import evaluate_digits, format_metrics
from difflab.pipelines import Pipeline

RESULTS = Path(__file__).resolve().parent / "results"


def load(model: str) -> Pipeline | None:
    try:
        return Pipeline.from_pretrained(model, device="cpu")
    except ValueError as error:
        print(f"skipped {model}: {error}", flush=True)
        return None


def likelihoods(pipe: Pipeline, images: torch.Tensor, seeds: list[int], tol: float) -> dict:
    """Bits/dim by the bound and by the ODE, one estimate per seed, with their spread."""
    out = {}
    for method in ("vlb", "ode"):
        runs = [model_bits_per_dim(pipe, images, method, seed=s, repeats=1, rtol=tol, atol=tol) for s in seeds]
        values = [r["bits_per_dim"] for r in runs]
        out[method] = {
            "bits_per_dim": statistics.fmean(values),
            "per_seed": values,
            "spread": max(values) - min(values),
            "seconds": sum(r["seconds"] for r in runs),
            "nfe": sum(r["nfe"] for r in runs),
        }
        print(f"  {method}: {out[method]['bits_per_dim']:.3f} bits/dim (seeds {values})", flush=True)
    return out


def quality(pipe: Pipeline, n: int, sampler: str, steps: int) -> dict:
    """Digits FD and confident share of `n` samples, thresholded as the model's manifest says
    (the bare `pipe.denoiser` is not: DDIM from t = 999 on the cosine schedule then diverges)."""
    denoiser, cond = pipe.condition(n)
    metrics, _ = evaluate_digits(denoiser, n=n, seed=0, cond=cond, **pipe.settings(sampler, steps))
    print("  " + format_metrics(metrics), flush=True)
    return {k: metrics[k] for k in ("digits_fd", "floor_fd_same_count", "confident_share", "sampling_seconds")}


def goals(models: dict) -> dict:
    def bpd(name: str, method: str) -> float | None:
        return models.get(name, {}).get("likelihood", {}).get(method, {}).get("bits_per_dim")

    def fd(name: str) -> float | None:
        return models.get(name, {}).get("ddim-50", {}).get("digits_fd")

    out = {}
    if bpd("hybrid", "vlb") is not None and bpd("simple", "vlb") is not None:
        out["hybrid_below_simple_bpd"] = bpd("hybrid", "vlb") < bpd("simple", "vlb")
        out["hybrid_fd_within_1.2x"] = fd("hybrid") <= 1.2 * fd("simple")
    for name, m in models.items():
        if "likelihood" in m:
            lik = m["likelihood"]
            out[f"{name}_ode_at_most_0.95x_bound"] = lik["ode"]["bits_per_dim"] <= 0.95 * lik["vlb"]["bits_per_dim"]
            out[f"{name}_seed_spread_below_0.02"] = max(lik["ode"]["spread"], lik["vlb"]["spread"]) < 0.02
    return out


def ncsn_ratios(models: dict) -> dict:
    """NCSN's digits FD per sampler over the same network's DDPM (the simple model, DDIM-50)."""
    if "ncsn" not in models or "simple" not in models:
        return {}
    ddpm = models["simple"]["ddim-50"]["digits_fd"]
    return {k: v["digits_fd"] / ddpm for k, v in models["ncsn"].items() if isinstance(v, dict)}


NAMES = ("simple", "hybrid", "vlb", "ncsn")
SETTINGS = ("test_images", "seeds", "ode_tolerance", "n", "bound")
BOUND = "x0 thresholded as the manifest says"  # results before it scored the bare network


def earlier_models(path: Path, settings: dict) -> dict:
    """The model rows of an earlier result, which must have been measured with the same settings."""
    earlier = json.loads(path.read_text())
    differ = [k for k in SETTINGS if earlier.get(k) != settings[k]]
    if differ:
        raise SystemExit(f"{path} was measured with other settings ({', '.join(differ)}); measure it again")
    return earlier["models"]


def measure(name: str, model: str, images: torch.Tensor, args) -> dict | None:
    pipe = load(model)
    if pipe is None:
        return None
    print(f"[{name}] {model}", flush=True)
    if name == "ncsn":
        langevin = quality(pipe, args.n, "langevin", args.langevin_levels)
        return {"model": model, f"langevin-{args.langevin_levels}x20": langevin,
                f"pc-{args.pc_steps}": quality(pipe, args.n, "pc", args.pc_steps)}  # fmt: skip
    row = {"model": model, "likelihood": likelihoods(pipe, images, args.seeds, args.tol)}
    row["ddim-50"] = quality(pipe, args.n, "ddim", 50)
    if pipe.manifest["variance"] == "learned":
        row[f"ddpm-{args.ddpm_steps}"] = quality(pipe, args.n, "ddpm", args.ddpm_steps)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--simple", default="digits-ddpm")
    p.add_argument("--hybrid", default="runs/digits-hybrid")
    p.add_argument("--vlb", default="runs/digits-vlb")
    p.add_argument("--ncsn", default="runs/digits-ncsn")
    p.add_argument("--only", nargs="+", choices=NAMES, default=None, help="measure these; keep the rest from --out")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=[],
        metavar="RESULT",
        help="join the models of these results (same settings); measures nothing without --only",
    )
    p.add_argument("--images", type=int, default=128, help="test digits to score (of 297)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=500, help="samples for digits FD")
    p.add_argument("--ddpm-steps", type=int, default=100, help="respaced ancestral steps for learned variances")
    p.add_argument("--langevin-levels", type=int, default=10, help="noise levels of annealed Langevin (20 steps each)")
    p.add_argument("--pc-steps", type=int, default=100, help="predictor steps of PC (one corrector step each)")
    p.add_argument("--tol", type=float, default=1e-4, help="rtol = atol of the ODE solver")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "likelihood.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"test_images": args.images, "seeds": args.seeds, "ode_tolerance": args.tol, "n": args.n, "bound": BOUND}
    models = {}
    for path in ([args.out] if args.only and args.out.exists() else []) + args.merge:
        models.update(earlier_models(path, settings))
    images = eight_bit_test_digits(16, args.images)
    for name in args.only or ([] if args.merge else NAMES):
        row = measure(name, getattr(args, name), images, args)
        if row is not None:
            models[name] = row
    result = {
        **settings,
        "models": {name: models[name] for name in NAMES if name in models},
        "goals": goals(models),
        "ncsn_fd_over_ddpm": ncsn_ratios(models),
        "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
