"""Likelihood and sample quality of the improved-DDPM objectives and of NCSN, on digits.

    python benchmarks/likelihood.py [--simple digits-ddpm] [--hybrid runs/digits-hybrid]
                                    [--vlb runs/digits-vlb] [--ncsn runs/digits-ncsn]
                                    [--images 297] [--seeds 0 1 2] [--n 1000]

For each of the L_simple, L_hybrid and L_vlb models (configs/digits-ddpm.toml, digits-hybrid.toml,
digits-vlb.toml: one network, three objectives): bits/dim of the test digits re-quantised to
8 bits, by the variational bound and exactly through the probability-flow ODE (one value per
seed: dequantisation, Hutchinson probe and forward noise), and digits FD / confident share of
`--n` samples (DDIM-50, and ancestral DDPM-1000 for the learned-variance models). For the NCSN
recipe (digits-ncsn.toml): FD with annealed Langevin and with predictor-corrector, against the
DDPM of the same network. A missing run is skipped and reported.

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

from difflab.eval.likelihood import bits_per_dim, eight_bit_test_digits
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
        runs = [bits_per_dim(pipe.denoiser, images, method, seed=s, repeats=1, rtol=tol, atol=tol) for s in seeds]
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
    metrics, _ = evaluate_digits(pipe.denoiser, n=n, seed=0, **pipe.settings(sampler, steps))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--simple", default="digits-ddpm")
    p.add_argument("--hybrid", default="runs/digits-hybrid")
    p.add_argument("--vlb", default="runs/digits-vlb")
    p.add_argument("--ncsn", default="runs/digits-ncsn")
    p.add_argument("--images", type=int, default=297, help="test digits to score (all 297 by default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=1000, help="samples for digits FD")
    p.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of the ODE solver")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "likelihood.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = eight_bit_test_digits(16, args.images)
    models: dict[str, dict] = {}
    for name in ("simple", "hybrid", "vlb"):
        pipe = load(getattr(args, name))
        if pipe is None:
            continue
        print(f"[{name}] {getattr(args, name)}", flush=True)
        models[name] = {"model": getattr(args, name), "likelihood": likelihoods(pipe, images, args.seeds, args.tol)}
        models[name]["ddim-50"] = quality(pipe, args.n, "ddim", 50)
        if pipe.manifest["variance"] == "learned":
            models[name]["ddpm-1000"] = quality(pipe, args.n, "ddpm", 1000)
    pipe = load(args.ncsn)
    if pipe is not None:
        print(f"[ncsn] {args.ncsn}", flush=True)
        models["ncsn"] = {"model": args.ncsn, "langevin-100": quality(pipe, args.n, "langevin", 100),
                          "pc-500": quality(pipe, args.n, "pc", 500)}  # fmt: skip
    result = {
        "test_images": args.images,
        "seeds": args.seeds,
        "ode_tolerance": args.tol,
        "models": models,
        "goals": goals(models),
        "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
