"""Sampler benchmark: sample quality against NFE with the exact mixture denoiser, next to
diffusers' counterpart of each sampler, and the cost of a sampler step next to diffusers'.

Quality: for a 2-D and a 64-D Gaussian mixture (T = 1000 linear schedule, exact denoiser
E[x0 | x_t]), the sliced Wasserstein-2 distance between N generated samples and a large
reference sample, next to the noise floor: the same distance for N fresh *true* samples.
A ratio SW2 / floor near 1 means the sampler's error is invisible at this sample size.
NFE is counted by a wrapper around the denoiser (Heun: 2 per step but the last; PC:
predictor + corrector; Langevin: n_steps per level + 1 final denoise).

diffusers: each counterpart scheduler (`DIFFUSERS`, its defaults but the schedule and
clip_sample=False) runs its own loop (set_timesteps, scale_model_input, step) from the same
x_T (times its init_noise_sigma) with the same exact oracle: at each model call the oracle
reads the noise level the scheduler is at (its sigmas[step_index], or alphas_cumprod[t]), so
each sampler is judged at the levels it believes it is at. Same NFE budgets, same draws.

Cost: microseconds per network evaluation of a whole sampling call with a free network (a
module returning a fixed eps tensor): difflab's `sample` (planning, the loop, the eps -> x0
conversion of its NetworkDenoiser) against diffusers' set_timesteps + loop + step, at batch
(1, 64) and (4096, 64), 50 steps, float32, medians of interleaved repeats; "sampler only"
is difflab with a free *denoiser* (a fixed Prediction), the step arithmetic alone.
Overhead (older measure): time per sampler step minus the denoiser's time, with a constant
denoiser, at batch 1 and 4096 x 2.

    python benchmarks/samplers.py            # full run (22 min on 2 CPU cores shared with training)
    python benchmarks/samplers.py --quick    # smoke run (~1 min)
    python benchmarks/samplers.py --sections cost   # re-measure the cost only, keep the rest

Writes benchmarks/results/samplers.json and benchmarks/results/samplers.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from difflab.denoiser import Denoiser, DenoiserWrapper, MixtureDenoiser, NetworkDenoiser
from difflab.mixture import GaussianMixture
from difflab.process import Prediction
from difflab.samplers import SAMPLERS, default_spacing, get_timesteps, sample
from difflab.schedules import Schedule

RESULTS = Path(__file__).parent / "results"
NFES = (5, 10, 20, 50, 100, 1000)
DIFFUSERS_NFES = (5, 10, 20, 50, 100)  # the range the comparison is about

# difflab sampler -> (diffusers scheduler, its config beyond the schedule, stochastic step)
DIFFUSERS = {
    "ddpm": ("DDPMScheduler", {"clip_sample": False}, True),
    "ddim": ("DDIMScheduler", {"clip_sample": False}, False),
    "euler": ("EulerDiscreteScheduler", {}, False),
    "heun": ("HeunDiscreteScheduler", {}, False),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, False),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, True),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True),
    "unipc": ("UniPCMultistepScheduler", {}, False),
}
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


# ---------------------------------------------------------------- data
def mixture_2d() -> GaussianMixture:
    """Six correlated Gaussians on a ring, weights 1..6 (unequal), stds 0.1-0.35."""
    g = torch.Generator().manual_seed(0)
    k = torch.arange(6, dtype=torch.float64)
    angle = 2 * math.pi * k / 6
    means = 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
    rot = torch.rand(6, generator=g, dtype=torch.float64) * math.pi
    c, s = rot.cos(), rot.sin()
    R = torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)
    stds = 0.1 + 0.25 * torch.rand(6, 2, generator=g, dtype=torch.float64)
    covs = R @ torch.diag_embed(stds**2) @ R.transpose(1, 2)
    return GaussianMixture(k + 1, means, covs)


def mixture_64d() -> GaussianMixture:
    """Eight full-covariance Gaussians in 64-D with random weights."""
    g = torch.Generator().manual_seed(1)
    K, D = 8, 64
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    A = torch.randn(K, D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    covs = 0.1 * A @ A.transpose(1, 2) + 0.02 * torch.eye(D, dtype=torch.float64)
    return GaussianMixture(torch.rand(K, generator=g, dtype=torch.float64) + 0.2, means, covs)


class Counting(DenoiserWrapper):
    """Counts network evaluations, whatever the sampler claims."""

    def __init__(self, inner: Denoiser):
        super().__init__(inner)
        self.nfe = 0

    def predict(self, x_t, t, cond):
        self.nfe += 1
        return self.inner.predict(x_t, t, cond)


def diffusers_scheduler(name: str):
    import diffusers

    cls, config, _ = DIFFUSERS[name]
    return getattr(diffusers, cls)(**SCHEDULE, **config)


def diffusers_level(scheduler, t) -> float:
    """alpha_bar of the level a diffusers scheduler is at for this model call."""
    if hasattr(scheduler, "sigmas"):
        sigma = scheduler.sigmas[scheduler.step_index or 0].item()
        return 1.0 / (1.0 + sigma * sigma)
    return scheduler.alphas_cumprod[int(t)].item()


def diffusers_sample(name: str, model, x_T: torch.Tensor, steps: int, generator=None, scheduler=None):
    """diffusers' sampling loop for the counterpart of `name`; `model(x, t, alpha_bar) -> eps`."""
    scheduler = scheduler if scheduler is not None else diffusers_scheduler(name)
    stochastic = DIFFUSERS[name][2]
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        eps = model(x_in, t, scheduler)
        out = scheduler.step(eps, t, x, generator=generator) if stochastic else scheduler.step(eps, t, x)
        x = out.prev_sample
    return x


class MixtureEps:
    """The exact eps of the mixture at the level the scheduler is at, counting calls."""

    def __init__(self, mixture: GaussianMixture):
        self.mixture, self.nfe = mixture, 0

    def __call__(self, x_in, t, scheduler):
        self.nfe += 1
        a = diffusers_level(scheduler, t)
        x0 = self.mixture.posterior_mean(x_in, torch.tensor(a, dtype=torch.float64))
        return (x_in - math.sqrt(a) * x0) / math.sqrt(1.0 - a)


# ---------------------------------------------------------------- metric
class SlicedW2:
    """SW2 to a fixed reference: per random direction, the L2 distance between the sorted
    projections of the sample and the reference quantiles at the same levels."""

    def __init__(self, reference: torch.Tensor, n: int, n_dirs: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(reference.shape[1], n_dirs, generator=g, dtype=torch.float64)
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)
        proj = (reference @ self.dirs).T.contiguous()  # (P, M)
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        self.ref_q = torch.quantile(proj, levels, dim=1).T  # (P, n)
        self.n = n

    def __call__(self, x: torch.Tensor) -> float:
        if x.shape[0] != self.n:
            raise ValueError(f"expected {self.n} samples, got {x.shape[0]}")
        proj = (x.to(torch.float64) @ self.dirs).T.sort(dim=1).values
        return ((proj - self.ref_q) ** 2).mean().sqrt().item()


def sampler_plan(name: str, nfe: int) -> tuple[int, dict]:
    """Steps and options that spend at most `nfe` evaluations."""
    if name == "heun":
        return (nfe + 1) // 2, {}
    if name == "pc":
        return max(1, nfe // 2), {}
    if name == "langevin":
        n_steps = max(1, min(20, nfe // 10))
        return max(1, (nfe - 1) // n_steps), {"n_steps": n_steps}
    return nfe, {}


def quality(mixture: GaussianMixture, n: int, nfes, n_ref: int, n_dirs: int, n_floor: int, n_draws: int, log) -> dict:
    """SW2 / floor for every sampler and NFE budget, and for diffusers' counterparts at the
    budgets in DIFFUSERS_NFES; all averaged over the same independent draws."""
    schedule = Schedule.make("linear", T=1000)
    den = MixtureDenoiser(mixture, schedule)
    g = torch.Generator().manual_seed(123)
    metric = SlicedW2(mixture.sample(n_ref, g), n, n_dirs)
    floors = [metric(mixture.sample(n, g)) for _ in range(n_floor)]
    floor = sum(floors) / len(floors)
    log(
        f"  D={mixture.D}: noise floor SW2 = {floor:.4f} (one draw's sd {torch.tensor(floors).std().item():.4f}, n={n})"
    )
    out = {
        "D": mixture.D,
        "K": mixture.K,
        "n": n,
        "n_ref": n_ref,
        "n_dirs": n_dirs,
        "floor": floor,
        "floor_sd": torch.tensor(floors).std().item(),
        "schedule": "linear",
        "T": schedule.T,
        "samplers": {},
        "diffusers": {},
    }

    def x_T(d):
        return torch.randn(n, mixture.D, generator=torch.Generator().manual_seed(7 + d), dtype=torch.float64)

    def measure(run, nfe, label):
        draws = n_draws if nfe <= 100 else 1  # one draw's SW2 is as noisy as the floor's
        sw2s, used, t0 = [], 0, time.perf_counter()
        for d in range(draws):
            x, nfe_used = run(x_T(d), torch.Generator().manual_seed(11 + d))
            sw2s.append(metric(x) if torch.isfinite(x).all() else math.inf)
            used = nfe_used
        seconds = (time.perf_counter() - t0) / draws
        sw2 = sum(sw2s) / draws
        log(f"    {label:22s} NFE {used:5d} SW2 {sw2:.4f} ({sw2 / floor:7.2f} x floor, {draws} draws) {seconds:.1f}s")
        return {"nfe_budget": nfe, "nfe": used, "draws": draws, "sw2": sw2, "ratio": sw2 / floor, "seconds": seconds}

    for name in SAMPLERS:
        rows = []
        for nfe in nfes:
            steps, options = sampler_plan(name, nfe)

            def run(x, gen, steps=steps, options=options, name=name):
                counting = Counting(den)
                y = sample(counting, (n, mixture.D), name, steps=steps, x_T=x, progress=False, generator=gen, **options)
                return y, counting.nfe

            row = measure(run, nfe, name)
            rows.append({**row, "steps": steps, "options": options, "spacing": default_spacing(name, schedule)})
        out["samplers"][name] = rows
        if name not in DIFFUSERS:
            continue
        rows = []
        for nfe in (b for b in nfes if b in DIFFUSERS_NFES):
            steps = sampler_plan(name, nfe)[0]

            def run(x, gen, steps=steps, name=name):
                oracle = MixtureEps(mixture)
                return diffusers_sample(name, oracle, x, steps, gen), oracle.nfe

            rows.append({**measure(run, nfe, f"diffusers {DIFFUSERS[name][0]}"), "steps": steps})
        out["diffusers"][name] = rows
    out["vs_diffusers"] = compare(out, n_draws)
    best = min(
        ((name, r) for name, rows in out["samplers"].items() for r in rows if r["nfe"] <= 20),
        key=lambda item: item[1]["ratio"],
    )
    out["best_nfe_le_20"] = {"sampler": best[0], "nfe": best[1]["nfe"], "ratio": best[1]["ratio"]}
    return out


def compare(res: dict, n_draws: int) -> dict:
    """Per sampler and NFE budget: difflab's and diffusers' SW2 / floor, and whether difflab is
    no worse: its ratio at most diffusers' plus twice the standard error of a mean over the
    draws (floor_sd / floor / sqrt(draws)), below which a difference is sampling noise."""
    tol = 2.0 * res["floor_sd"] / res["floor"] / math.sqrt(n_draws)
    out = {"tolerance": tol}
    for name, rows in res["diffusers"].items():
        ours = {r["nfe_budget"]: r for r in res["samplers"][name]}
        out[name] = {
            str(r["nfe_budget"]): {
                "difflab": ours[r["nfe_budget"]]["ratio"],
                "diffusers": r["ratio"],
                "no_worse": ours[r["nfe_budget"]]["ratio"] <= r["ratio"] + tol,
            }
            for r in rows
        }
    return out


# ---------------------------------------------------------------- overhead
class Constant(Denoiser):
    """A denoiser that costs (almost) nothing: the sampler's own work is what remains."""

    prediction = "x0"

    def __init__(self, schedule: Schedule, shape):
        self.schedule, self.sample_shape = schedule, tuple(shape[1:])
        self.pred = Prediction(torch.zeros(shape), torch.zeros(shape))

    def predict(self, x_t, t, cond):
        return self.pred


def overhead(batches, steps: int, repeats: int, log) -> dict:
    schedule = Schedule.make("linear", T=1000)
    out = {}
    for batch in batches:
        shape = (batch, 2)
        den = Counting(Constant(schedule, shape))
        x_T = torch.randn(shape)
        t = torch.tensor(500).expand(batch)
        per_call = _best_time(repeats, _calls, den, x_T, t, steps) / steps
        row = {"denoiser_us_per_call": 1e6 * per_call}
        for name, fn in SAMPLERS.items():
            ts = get_timesteps(schedule, steps, default_spacing(name, schedule))
            options = {"n_steps": 1} if name == "langevin" else {}
            den.nfe = 0
            fn(den, x_T, ts, progress=False, generator=torch.Generator().manual_seed(0), **options)
            nfe = den.nfe
            total = _best_time(repeats, fn, den, x_T, ts, progress=False, **options)
            row[name] = {"us_per_step": 1e6 * (total - nfe * per_call) / steps, "nfe_per_step": nfe / steps}
            log(f"  batch {batch:5d} {name:9s} {row[name]['us_per_step']:7.1f} us/step")
        out[str(batch)] = row
    return out


class FreeNet(nn.Module):
    """A network that costs nothing: returns a fixed eps, whatever it is asked."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, t, cond=None):
        return self.out


def cost(shapes, steps: int, repeats: int, log) -> dict:
    """us per network evaluation of a whole sampling call with a free network, difflab against
    diffusers (setup included: planning / set_timesteps), medians of interleaved repeats."""
    out = {}
    for shape in shapes:
        row = {name: cost_row(name, tuple(shape), steps, repeats) for name in DIFFUSERS}
        for name, r in row.items():
            log(
                f"  {tuple(shape)} {name:13s} difflab {r['difflab_us']:8.1f} us  diffusers {r['diffusers_us']:8.1f} us "
                f"({r['ratio']:.2f}x; sampler only {r['sampler_only_us']:8.1f} us, {r['sampler_only_ratio']:.2f}x)"
            )
        out["x".join(map(str, shape))] = row
    return out


def cost_row(name: str, shape: tuple, steps: int, repeats: int) -> dict:
    schedule = Schedule.make("linear", T=1000)
    g = torch.Generator().manual_seed(0)
    x_T, eps = torch.randn(shape, generator=g), 0.1 * torch.randn(shape, generator=g)
    net = FreeNet(eps)
    networked = NetworkDenoiser(net, schedule, "eps", sample_shape=shape[1:])
    steps, options = sampler_plan(name, steps)
    counting = Counting(networked)
    sample(counting, shape, name, steps=steps, x_T=x_T, progress=False, **options)
    nfe = counting.nfe
    scheduler = diffusers_scheduler(name)

    def ours(den):
        sample(den, shape, name, steps=steps, x_T=x_T, progress=False, generator=torch.Generator(), **options)

    def theirs():
        diffusers_sample(name, lambda x, t, s: net(x, t), x_T, steps, torch.Generator(), scheduler)

    constant = Constant(schedule, shape)
    runs = {"difflab": lambda: ours(networked), "diffusers": theirs, "sampler_only": lambda: ours(constant)}
    times = {key: [] for key in runs}
    for _ in range(repeats):  # interleaved, so a slow spell of the shared machine hits all three
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {key: 1e6 * statistics.median(v) / nfe for key, v in times.items()}
    return {
        "nfe": nfe,
        "difflab_us": med["difflab"],
        "diffusers_us": med["diffusers"],
        "sampler_only_us": med["sampler_only"],
        "ratio": med["difflab"] / med["diffusers"],
        "sampler_only_ratio": med["sampler_only"] / med["diffusers"],
    }


def _best_time(repeats: int, fn, *args, **kwargs) -> float:
    """Fastest of `repeats` runs: the least disturbed by other work on shared cores."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best


def _calls(den, x, t, n):
    for _ in range(n):
        den(x, t)


# ---------------------------------------------------------------- report
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = results["quality"]
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(6.0 * (len(datasets) + 1), 4.8))
    for ax, (key, res) in zip(axes, datasets.items()):
        for j, (name, rows) in enumerate(res["samplers"].items()):
            colour = f"C{j % 10}"
            style = "-" if j < 10 else "-."
            ax.plot([r["nfe"] for r in rows], [r["ratio"] for r in rows], style, marker="o", ms=3, color=colour,
                    label=name)  # fmt: skip
            theirs = res["diffusers"].get(name)
            if theirs:
                ax.plot([r["nfe"] for r in theirs], [r["ratio"] for r in theirs], ":", marker="x", ms=4, color=colour)
        ax.axhline(1.0, color="k", ls="--", lw=1, label="noise floor")
        ax.set(
            xscale="log",
            yscale="log",
            ylim=(0.4, 300),
            xlabel="NFE",
            ylabel="SW2 / noise floor",
            title=f"{key}: {res['K']}-component mixture, n={res['n']} (dotted x: diffusers)",
        )
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=2)
    ax = axes[-1]
    names = list(DIFFUSERS)
    for j, (batch, row) in enumerate(results["cost"].items()):
        ax.bar([i + 0.4 * j for i in range(len(names))], [row[n]["ratio"] for n in names], width=0.4,
               label=f"batch {batch}")  # fmt: skip
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=45)
    ax.set(ylabel="difflab / diffusers time per NFE", title="cost per step, free network (lower: difflab faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SECTIONS = ("quality", "cost", "overhead")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest when shared)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results (quick: a temp dir)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="re-measure only these; the JSON's other sections are kept")  # fmt: skip
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run must not overwrite the real results
        args.out = Path(tempfile.gettempdir()) / "difflab-bench" if args.quick else RESULTS
    torch.set_num_threads(args.threads)
    log = print
    started = time.perf_counter()
    if args.quick:
        cfg = dict(n2=1000, n64=200, nfes=(5, 20), n_ref=20_000, n_dirs=64, n_floor=2, n_draws=1, steps=100, repeats=2)
        cfg.update(cost_steps=10, cost_repeats=2)
    else:
        cfg = dict(
            n2=10_000, n64=1000, nfes=NFES, n_ref=200_000, n_dirs=256, n_floor=20, n_draws=3, steps=500, repeats=5
        )
        cfg.update(cost_steps=50, cost_repeats=7)
    path = args.out / "samplers.json"
    partial = set(args.sections) != set(SECTIONS)
    results = json.loads(path.read_text()) if partial and path.is_file() else {}
    today = time.strftime("%Y-%m-%d")
    results["config"] = {
        **cfg,
        "quick": args.quick,
        "threads": args.threads,
        "torch": torch.__version__,
        "diffusers": _diffusers_version(),
        "diffusers_schedule": SCHEDULE,
        "diffusers_counterparts": {k: [v[0], v[1]] for k, v in DIFFUSERS.items()},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "measured_on": {**results.get("config", {}).get("measured_on", {}), **dict.fromkeys(args.sections, today)},
    }
    if "quality" in args.sections:
        log("quality (SW2 vs NFE)")
        results["quality"] = {
            key: quality(mixture, n, cfg["nfes"], n_ref, cfg["n_dirs"], cfg["n_floor"], cfg["n_draws"], log)
            for key, mixture, n, n_ref in [
                ("2d", mixture_2d(), cfg["n2"], cfg["n_ref"]),
                ("64d", mixture_64d(), cfg["n64"], cfg["n_ref"] // 4),
            ]
        }
    if "cost" in args.sections:
        log("cost (us per NFE of a whole call, free network, difflab vs diffusers)")
        results["cost"] = cost([(1, 64), (4096, 64)], cfg["cost_steps"], cfg["cost_repeats"], log)
    if "overhead" in args.sections:
        log("overhead (us per step, constant denoiser)")
        results["overhead"] = overhead((1, 4096), cfg["steps"], cfg["repeats"], log)
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    if "quality" in results and "cost" in results:  # a partial run with no earlier JSON has no picture
        plot(results, args.out / "samplers.png")
    for key, res in results.get("quality", {}).items():
        best = res["best_nfe_le_20"]
        log(f"{key}: best at NFE <= 20: {best['sampler']} (NFE {best['nfe']}) at {best['ratio']:.2f} x floor")
        worse = [
            f"{name}@{nfe}: {c['difflab']:.2f} vs {c['diffusers']:.2f}"
            for name, rows in res["vs_diffusers"].items()
            if name != "tolerance"
            for nfe, c in rows.items()
            if not c["no_worse"]
        ]
        tol = res["vs_diffusers"]["tolerance"]
        log(f"{key}: worse than diffusers (by more than {tol:.2f}): {', '.join(worse) or 'none'}")
    log(f"done in {results['seconds']:.0f}s -> {args.out}")
    return results


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


if __name__ == "__main__":
    main()
