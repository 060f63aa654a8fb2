"""The `difflab` command: train | sample | eval | demo | schedules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from difflab import __version__

DEMO_MODEL = "digits-ddpm"


def cmd_schedules(args: argparse.Namespace) -> int:
    from difflab.schedules import SCHEDULE_NAMES, Schedule
    from difflab.viz import plot_schedules

    print(f"{'schedule':<22}{'alpha_bar[0]':>14}{'alpha_bar[T-1]':>16}{'logSNR[0]':>11}{'logSNR[T-1]':>13}")
    for name in SCHEDULE_NAMES:
        for ztsnr in (False, True):
            s = Schedule.make(name, T=args.T, zero_terminal_snr=ztsnr)
            print(
                f"{s.name:<22}{s.alpha_bar[0].item():>14.6f}{s.alpha_bar[-1].item():>16.3e}"
                f"{s.log_snr[0].item():>11.2f}{s.log_snr[-1].item():>13.2f}"
            )
    print(f"wrote {plot_schedules(args.out, T=args.T)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from difflab.train import TrainingDiverged, TrainingInterrupted, load_config, run

    if args.config is None and args.resume is None:
        raise ValueError("give a recipe (difflab train configs/NAME.toml) or --resume RUN")
    if args.resume is not None:
        config = load_config(args.config, args.set) if args.config else None
        run_dir = Path(args.resume)
        overrides = () if args.config else args.set
    else:
        config = load_config(args.config, args.set)  # validates everything before any work
        run_dir = Path(args.out or Path("runs") / Path(args.config).stem)
        overrides = ()
    try:
        out = run(config, run_dir, resume=args.resume is not None, overrides=overrides)
    except TrainingDiverged as e:
        print(f"difflab train: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"difflab train: interrupted; {e}", file=sys.stderr)
        return 128 + e.signum
    print(f"trained model in {out / 'model'}")
    return 0


def _load(model: str):
    from difflab.pretrained import resolve
    from difflab.train import load_pipeline

    return load_pipeline(resolve(model))


def _decoder(model: str):
    """The latent pipeline's decoder, None for pixel models."""
    from difflab.pretrained import resolve
    from difflab.train import load_decoder

    return load_decoder(resolve(model))


def _sampling_settings(args: argparse.Namespace, meta: dict) -> dict:
    defaults = meta.get("sample", {})
    return {
        "sampler": args.sampler or defaults.get("sampler", "ddim"),
        "steps": args.steps or defaults.get("steps", 50),
        "eta": args.eta if args.eta is not None else defaults.get("eta", 0.0),
    }


def _conditioned(args: argparse.Namespace):
    """The loaded model wrapped for its condition (class label or prompt) and guidance, the
    condition for `args.n` samples, and the sampler settings."""
    from difflab.guidance import conditioned

    denoiser, meta = _load(args.model)
    scale = args.guidance if args.guidance is not None else meta.get("sample", {}).get("guidance", 0.0)
    denoiser, cond = conditioned(
        denoiser,
        meta,
        args.n,
        scale=scale,
        label=args.label,
        prompt=getattr(args, "prompt", None),
        negative_prompt=getattr(args, "negative_prompt", None),
    )
    return denoiser, cond, _sampling_settings(args, meta), meta


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from difflab.data.images import to_uint8_images
    from difflab.eval.report import sample_batched
    from difflab.viz import save_samples

    denoiser, cond, settings, _ = _conditioned(args)
    decode = _decoder(args.model)
    x = sample_batched(denoiser, args.n, seed=args.seed, cond=cond, progress=True, decode=decode, **settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_samples(x, out / "samples.png")
    arrays = {"samples": x.numpy()}
    if x.ndim == 4:
        arrays["images_uint8"] = to_uint8_images(x).numpy()
    if cond is not None and "y" in cond:
        arrays["labels"] = cond["y"].numpy()
    if args.prompt is not None:
        arrays["prompt"] = np.array(args.prompt)
    np.savez_compressed(out / "samples.npz", **arrays)
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'} ({args.n} samples, {settings})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from difflab.eval.report import evaluate_digits, format_metrics

    denoiser, cond, settings, meta = _conditioned(args)
    data = meta.get("data", {}).get("name", "unknown data")
    if data != "digits":
        raise ValueError(f"difflab eval measures digits models; {args.model} was trained on {data}")
    if args.nll and meta.get("latent") is not None:  # refused before any sampling
        raise ValueError("--nll bounds the likelihood of pixels; a latent model's bound is on latents, not images")
    metrics, _ = evaluate_digits(
        denoiser, n=args.n, seed=args.seed, cond=cond, progress=True, decode=_decoder(args.model), **settings
    )
    if args.nll:
        from difflab.data.digits import DigitsDataset
        from difflab.eval.metrics import nll_bpd

        test = DigitsDataset("test", size=denoiser.sample_shape[-1]).images
        metrics["nll_bits_per_dim"] = nll_bpd(denoiser, test, batch_size=300, progress=True)
    print(format_metrics(metrics))
    if "nll_bits_per_dim" in metrics:
        print(f"NLL bound on the test digits: {metrics['nll_bits_per_dim']:.3f} bits/dim")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Sample from the shipped digits model and measure the samples; `--train` retrains it
    first from the recipe that made it."""
    from difflab.data.images import save_grid
    from difflab.eval.report import evaluate_digits, format_metrics
    from difflab.guidance import conditioned
    from difflab.pretrained import ROOT

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ROOT / DEMO_MODEL
    if args.train:
        from difflab.train import load_config, run

        run_dir = out / "run"
        run(load_config(model / "recipe.toml", args.set), run_dir)
        model = run_dir
    denoiser, meta = _load(str(model))
    denoiser, _ = conditioned(denoiser, meta, args.n)
    metrics, samples = evaluate_digits(denoiser, "ddim", 50, n=args.n, seed=args.seed, progress=True)
    save_grid(samples[:100], out / "samples.png", nrow=10)
    recorded = model / "metrics.json"
    if recorded.is_file() and not args.train:
        metrics["recorded"] = json.loads(recorded.read_text())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_metrics(metrics))
    if "recorded" in metrics and "nll_bits_per_dim" in metrics["recorded"]:
        print(
            f"NLL bound on the test digits (recorded by benchmarks/digits.py): "
            f"{metrics['recorded']['nll_bits_per_dim']:.3f} bits/dim"
        )
    print(f"wrote {out / 'samples.png'} and {out / 'metrics.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflab", description="Diffusion models: train, sample, evaluate.")
    p.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a recipe (configs/*.toml), or resume a run")
    t.add_argument("config", nargs="?", help="recipe TOML file")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe key")
    t.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    t.add_argument("--out", metavar="RUN", help="run folder (default runs/<recipe name>)")
    t.set_defaults(func=cmd_train)

    def sampling_args(c: argparse.ArgumentParser, n: int) -> None:
        c.add_argument("model", help="run folder, model folder or shipped model name (e.g. digits-ddpm)")
        c.add_argument("--label", type=int, help="class label for class-conditional models (default: cycle)")
        c.add_argument("--guidance", type=float, help="classifier-free guidance weight w (0 = none)")
        c.add_argument("--sampler", help="ddpm, ddim, euler, heun, dpmpp_2m, langevin, pc (default: the model's)")
        c.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
        c.add_argument("--eta", type=float, help="DDIM eta")
        c.add_argument("--n", type=int, default=n, help="number of samples")
        c.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("sample", help="sample from a model: grid PNG + .npz")
    sampling_args(s, 64)
    s.add_argument("--prompt", help='caption for text-conditional models, e.g. "a small red circle at the top left"')
    s.add_argument("--negative-prompt", help="text-conditional models: steer away from this caption (with --guidance)")
    s.add_argument("--out", default="out/samples")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="measure a digits model: digits FD, confident share, class histogram")
    sampling_args(e, 300)
    e.add_argument("--nll", action="store_true", help="also the NLL bound on the test split (T network calls)")
    e.add_argument("--out", help="write the metrics as JSON here")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="the main job: sample from the shipped model and report its metrics")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--n", type=int, default=200, help="samples to measure")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--train", action="store_true", help="retrain the shipped model from its recipe first")
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="with --train")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("schedules", help="print the noise schedules and plot alpha_bar and log-SNR (PNG)")
    c.add_argument("--T", type=int, default=1000)
    c.add_argument("--out", default="schedules.png")
    c.set_defaults(func=cmd_schedules)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad input: a clear message, not a traceback
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
