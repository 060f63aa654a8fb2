"""The `difflab` command: train | sample | eval | demo | models | export | cascade | unclip | serve | schedules."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

from difflab import __version__

DEMO_MODEL = "digits-ddpm"
FAST_MODEL = "digits-pd"  # the shipped one-step model (5 rounds of progressive distillation, 32 steps -> 1)
DEMO_STEPS = 20  # DDIM steps of every demo grid: the whole demo stays well under a minute on 2 cores


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
    from difflab.train.distributed import process_rank

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
    if process_rank()[0] == 0:  # under torchrun, once
        print(f"trained model in {out / 'model'}")
    return 0


def _pipeline(args: argparse.Namespace, model: str | Path | None = None):
    from difflab.pipelines import Pipeline

    return Pipeline.from_pretrained(model or args.model, device=args.device, dtype=args.dtype)


def _output_dir(path: str | Path) -> Path:
    """The output folder, created and checked writable before any sampling."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".difflab-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out} is not writable: {e.strerror or e}") from None
    return out


def _output_file(path: str | Path) -> Path:
    """An output file's path, checked before any work: not a folder, in a writable folder."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'metrics.json'}")
    _output_dir(out.parent)
    return out


def _call_options(args: argparse.Namespace) -> dict:
    """`Pipeline.generate`'s options from the sampling flags (None: the model's default)."""
    return {
        "steps": args.steps,
        "sampler": args.sampler,
        "spacing": args.spacing,
        "eta": args.eta,
        "guidance": args.guidance,
        "guidance_scale": args.guidance_scale,
        "label": args.label,
        "prompt": getattr(args, "prompt", None),
        "negative_prompt": getattr(args, "negative_prompt", None),
    }


def _grid_labels(pipe, n: int, label: int | None, prompts: list[str] | None) -> list[str] | None:
    """What to write under each image: its class or its caption."""
    if pipe.conditioning == "class":
        from difflab.guidance import class_labels

        return [str(int(y)) for y in class_labels(n, pipe.manifest["num_classes"], label)]
    if pipe.conditioning == "text" and prompts:
        return [prompts[i % len(prompts)] for i in range(n)]
    return None


def cmd_sample(args: argparse.Namespace) -> int:
    from difflab.pipelines.cascade import CascadePipeline
    from difflab.pipelines.unclip import is_unclip

    out = _output_dir(args.out)
    if is_unclip(args.model):
        return _sample_unclip(args, out)
    if args.variations is not None:
        raise ValueError("--variations is for unCLIP models (difflab unclip PRIOR DECODER --out DIR)")
    pipe = _pipeline(args)
    prompts = None
    if args.prompt is not None:  # one prompt per --prompt, cycled over the samples
        prompts = [args.prompt[i % len(args.prompt)] for i in range(args.n)]
    if isinstance(pipe, CascadePipeline):
        return _sample_cascade(args, pipe, out, prompts)
    if args.stage:
        raise ValueError("--stage sets a stage of a cascade; this model is not a cascade")
    options = {**_call_options(args), "prompt": prompts}
    options.update(control=args.control, control_strength=args.control_strength, guess_mode=args.guess_mode)
    started = time.perf_counter()
    x = pipe.generate(args.n, seed=args.seed, batch_size=args.batch_size, progress=True, **options)
    seconds = time.perf_counter() - started
    labels = _grid_labels(pipe, args.n, args.label, prompts) if x.ndim == 4 else None
    label_kind = "labels" if pipe.conditioning == "class" else "prompts"
    wrote = _write_samples(args, out, x, labels, label_kind)
    settings = pipe.settings(args.sampler, args.steps, args.spacing, args.eta)
    print(f"wrote {wrote} ({args.n} samples in {seconds:.1f} s, {settings})")
    return 0


def _write_samples(args: argparse.Namespace, out: Path, x, labels: list | None, label_kind: str) -> str:
    """samples.png (labelled grid), samples.npz (float samples, uint8 images, labels or prompts)
    and, with --save-each, one PNG per image; returns what was written, for the message."""
    import numpy as np

    from difflab.data.images import save_grid, to_uint8_images
    from difflab.viz import save_labelled_grid, save_samples

    arrays = {"samples": x.numpy()}
    if x.ndim == 4:
        save_labelled_grid(x, out / "samples.png", labels, nrow=args.nrow)
        arrays["images_uint8"] = to_uint8_images(x).numpy()
        if labels is not None:
            arrays[label_kind] = np.array(labels)
        if args.save_each:
            for i, image in enumerate(x):
                save_grid(image, out / "images" / f"{i:05d}.png", padding=0)
    else:
        save_samples(x, out / "samples.png")
    np.savez_compressed(out / "samples.npz", **arrays)
    each = f" and {len(x)} PNGs in {out / 'images'}" if args.save_each and x.ndim == 4 else ""
    return f"{out / 'samples.png'}, {out / 'samples.npz'}{each}"


def _sample_unclip(args: argparse.Namespace, out: Path) -> int:
    """An unCLIP model: text -> prior -> decoder (--prompt), or variations of an image (--variations)."""
    from difflab.devices import pick_device
    from difflab.pipelines.unclip import UnCLIPPipeline

    if (args.prompt is None) == (args.variations is None):
        raise ValueError("an unCLIP model needs exactly one of --prompt (text -> image) or --variations IMAGE.png")
    pipe = UnCLIPPipeline.from_pretrained(args.model, device=pick_device(args.device))
    guidance = args.guidance if args.guidance_scale is None else args.guidance_scale - 1.0
    options = {"guidance": guidance, "steps": args.steps, "sampler": args.sampler, "seed": args.seed}
    if args.variations is not None:
        x, labels = pipe.variations(args.variations, args.n, **options), None
    else:
        labels = [args.prompt[i % len(args.prompt)] for i in range(args.n)]
        x = pipe.generate(args.n, prompt=labels, **options)
    print(f"wrote {_write_samples(args, out, x, labels, 'prompts')} ({args.n} unCLIP samples)")
    return 0


def cmd_unclip(args: argparse.Namespace) -> int:
    """Join a trained prior and decoder (and their encoder) into one unCLIP folder."""
    from difflab.pipelines.unclip import assemble_unclip

    out = assemble_unclip(args.prior, args.decoder, args.out, args.prior_guidance)
    print(f"wrote the unCLIP model {out}; sample it with: difflab sample {out} --prompt ...")
    return 0


def _sample_cascade(args: argparse.Namespace, pipe, out: Path, prompts: list[str] | None) -> int:
    """A cascade: every stage's grid (stage-K.png; samples.png is the last stage's) and one .npz."""
    import numpy as np

    from difflab.data.images import to_uint8_images
    from difflab.viz import save_labelled_grid

    if args.control is not None or args.control_strength is not None or args.guess_mode is not None:
        raise ValueError("--control, --control-strength and --guess-mode are for ControlNet models, not cascades")
    guidance = args.guidance
    if args.guidance_scale is not None:
        if guidance is not None:
            raise ValueError("give --guidance (w) or --guidance-scale (w + 1), not both")
        guidance = args.guidance_scale - 1.0
    started = time.perf_counter()
    xs = pipe.generate_stages(
        args.n, label=args.label, prompt=prompts, negative_prompt=args.negative_prompt, seed=args.seed,
        stages=args.stage, batch_size=args.batch_size, progress=True, sampler=args.sampler, steps=args.steps,
        spacing=args.spacing, eta=args.eta, guidance=guidance,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    conditional = next((p for p in pipe.stages if p.conditioning), pipe.stages[-1])
    labels = _grid_labels(conditional, args.n, args.label, prompts)
    arrays = {}
    for k, x in enumerate(xs):
        save_labelled_grid(x.clamp(-1, 1), out / f"stage-{k}.png", labels, nrow=args.nrow)
        arrays[f"stage_{k}"] = x.numpy()
    save_labelled_grid(xs[-1].clamp(-1, 1), out / "samples.png", labels, nrow=args.nrow)
    arrays["samples"], arrays["images_uint8"] = xs[-1].numpy(), to_uint8_images(xs[-1]).numpy()
    np.savez_compressed(out / "samples.npz", **arrays)
    sizes = " -> ".join(f"{x.shape[-1]}x{x.shape[-2]}" for x in xs)
    print(f"wrote {', '.join(str(out / f'stage-{k}.png') for k in range(len(xs)))}, {out / 'samples.png'} and "
          f"{out / 'samples.npz'} ({args.n} samples, {sizes}, in {seconds:.1f} s)")  # fmt: skip
    return 0


def cmd_cascade(args: argparse.Namespace) -> int:
    """Join a base model and super-resolution stages into one cascade folder."""
    from difflab.pipelines.cascade import assemble_cascade

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; give a new one")
    _output_dir(out)
    assemble_cascade([args.base, *args.stages], out, args.stage)
    print(f"wrote the cascade {out} ({1 + len(args.stages)} stages); sample it with: difflab sample {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from difflab.eval.report import evaluate_digits, format_metrics

    pipe = _pipeline(args)
    if hasattr(pipe, "stages"):
        raise ValueError(f"{args.model} is a cascade; difflab eval measures single models (see benchmarks/cascade.py)")
    data = pipe.manifest.get("data", {}).get("name", "unknown data")
    if data != "digits":
        raise ValueError(f"difflab eval measures digits models; {args.model} was trained on {data}")
    if args.likelihood and pipe.manifest.get("latent") is not None:  # refused before any sampling
        raise ValueError("--likelihood scores pixels; a latent model's density is on latents, not images")
    if args.likelihood and pipe.manifest.get("conditioning") is not None:
        raise ValueError("--likelihood scores unconditional models (p(x)); this model is conditional")
    if args.out:
        _output_file(args.out)
    denoiser, cond = pipe.condition(args.n, args.guidance, args.label, guidance_scale=args.guidance_scale)
    settings = pipe.settings(args.sampler, args.steps, args.spacing, args.eta)
    metrics, _ = evaluate_digits(
        denoiser, n=args.n, seed=args.seed, cond=cond, progress=True, decode=pipe.decoder, **settings
    )
    if args.likelihood:
        from difflab.eval.likelihood import eight_bit_test_digits, model_bits_per_dim

        test = eight_bit_test_digits(pipe.manifest["sample_shape"][-1], args.likelihood_n)
        tol = {"rtol": args.ode_tol, "atol": args.ode_tol}
        metrics["likelihood"] = model_bits_per_dim(pipe, test, args.likelihood, seed=args.seed, progress=True, **tol)
    print(format_metrics(metrics))
    if "likelihood" in metrics:
        m = metrics["likelihood"]
        print(f"{m['method'].upper()} bits/dim of {m['num_images']} test digits (8-bit): {m['bits_per_dim']:.3f} "
              f"+- {m['sem']:.3f} ({len(m['per_repeat'])} repeats, {m['seconds']:.0f} s)")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


JUDGE = "shapes-judge"  # the attribute classifier shipped beside the text-to-image model


def cmd_demo(args: argparse.Namespace) -> int:
    """Sample from the shipped models and measure what can be measured: the unconditional
    digits model's metrics, the class-guided digits' accuracy, the text-guided shapes grid.
    `--train` retrains the unconditional model first from the recipe that made it."""
    from difflab.data.images import save_grid
    from difflab.eval.report import evaluate_digits, format_metrics
    from difflab.pipelines import shipped_models

    out = _output_dir(args.out)
    shipped = shipped_models()
    model = shipped[DEMO_MODEL]
    if args.train:
        from difflab.train import load_config, run

        run_dir = out / "run"
        run(load_config(model / "recipe.toml", args.set), run_dir)
        model = run_dir
    pipe = _pipeline(args, model)
    denoiser, _ = pipe.condition(args.n)
    metrics, samples = evaluate_digits(denoiser, "ddim", DEMO_STEPS, n=args.n, seed=args.seed, progress=True)
    save_grid(samples[:100], out / "samples.png", nrow=10)
    recorded = model / "metrics.json"
    if recorded.is_file() and not args.train:
        metrics["recorded"] = json.loads(recorded.read_text())
    print(f"[{DEMO_MODEL}] unconditional digits:")
    print("  " + format_metrics(metrics))
    if "recorded" in metrics and "nll_bits_per_dim" in metrics["recorded"]:
        print(f"  NLL bound on the test digits (recorded by benchmarks/digits.py): "
              f"{metrics['recorded']['nll_bits_per_dim']:.3f} bits/dim")  # fmt: skip
    wrote = [out / "samples.png"]
    if FAST_MODEL in shipped:
        metrics["one_step"] = _demo_one_step(args, shipped[FAST_MODEL], out / "one-step.png", metrics)
        wrote.append(out / "one-step.png")
    if "digits-cfg" in shipped:
        metrics["class_guided"] = _demo_class_guided(args, shipped["digits-cfg"], out / "class-guided.png")
        wrote.append(out / "class-guided.png")
    if "shapes-text" in shipped:
        metrics["text_guided"] = _demo_text_guided(args, shipped["shapes-text"], out / "text-guided.png")
        wrote.append(out / "text-guided.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {', '.join(map(str, wrote))} and {out / 'metrics.json'}")
    return 0


def _demo_one_step(args: argparse.Namespace, model: Path, path: Path, teacher: dict) -> dict:
    """The same number of digits in ONE network evaluation from the shipped one-step model (with
    its own sampler and step grid), its metrics and its time beside the DDPM's DDIM grid."""
    from difflab.data.images import save_grid
    from difflab.eval.report import evaluate_digits, format_metrics

    pipe = _pipeline(args, model)
    denoiser, _ = pipe.condition(args.n)
    pipe.generate(4, steps=1)  # warm-up: the first call pays for lazy initialisation
    metrics, samples = evaluate_digits(denoiser, n=args.n, seed=args.seed, **pipe.settings(steps=1))
    save_grid(samples[:100], path, nrow=10)
    speedup = teacher["sampling_seconds"] / max(metrics["sampling_seconds"], 1e-9)
    print(f"[{FAST_MODEL}] one-step digits (progressive distillation of a v-prediction digits model):")
    print("  " + format_metrics(metrics))
    print(f"  {args.n} digits in {metrics['sampling_seconds']:.2f} s (1 step) vs {teacher['sampling_seconds']:.2f} s "
          f"(DDIM-{DEMO_STEPS}): {speedup:.0f}x faster")  # fmt: skip
    return metrics


def _demo_class_guided(args: argparse.Namespace, model: Path, path: Path) -> dict:
    """50 class-guided digits (five of each class) and how many the shipped digits
    classifier reads as the class asked for."""
    import torch

    from difflab.eval.digits_classifier import load_digits_classifier
    from difflab.guidance import class_labels
    from difflab.viz import save_labelled_grid

    pipe = _pipeline(args, model)
    n, started = 50, time.perf_counter()
    labels = class_labels(n, pipe.manifest["num_classes"])
    x = pipe.generate(n, steps=DEMO_STEPS, seed=args.seed, progress=True)
    seconds = time.perf_counter() - started
    classifier = load_digits_classifier(x.shape[-1])
    with torch.no_grad():
        accuracy = (classifier(x).argmax(1) == labels).float().mean().item()
    save_labelled_grid(x, path, [str(int(y)) for y in labels], nrow=10, min_size=32)
    w = pipe.manifest["sample"]["guidance"]
    print(f"[digits-cfg] {n} class-guided digits (DDIM-{DEMO_STEPS}, w = {w}) in {seconds:.1f} s: "
          f"{accuracy * 100:.0f}% read as the class asked for")  # fmt: skip
    return {"n": n, "steps": DEMO_STEPS, "guidance": w, "accuracy": accuracy, "seconds": seconds}


def _demo_text_guided(args: argparse.Namespace, model: Path, path: Path) -> dict:
    """Shapes drawn from the captions of the first 16 test scenes, and the share whose
    every attribute (shape, colour, size, position) the shipped attribute classifier reads right."""
    from difflab.eval.shapes import ShapesJudge
    from difflab.pipelines.folder import shipped_root
    from difflab.train.tasks import load_classifier
    from difflab.viz import save_labelled_grid

    pipe = _pipeline(args, model)
    classifier, _ = load_classifier(shipped_root() / JUDGE)  # judged on the CPU, where samples return
    judge = ShapesJudge.for_test_scenes(classifier, 16, size=pipe.output_shape[-1])
    started = time.perf_counter()
    x = pipe.generate(len(judge.prompts), steps=DEMO_STEPS, prompt=judge.prompts, seed=args.seed, progress=True)
    seconds = time.perf_counter() - started
    scores = judge(x)
    save_labelled_grid(x, path, judge.prompts, nrow=8)
    w = pipe.manifest["sample"]["guidance"]
    print(f"[shapes-text] {len(x)} text-guided shapes (DDIM-{DEMO_STEPS}, w = {w}) in {seconds:.1f} s: "
          f"{scores['accuracy'] * 100:.0f}% with every attribute of the prompt right")  # fmt: skip
    return {"n": len(x), "steps": DEMO_STEPS, "guidance": w, "seconds": seconds, **scores}


def cmd_serve(args: argparse.Namespace) -> int:
    """A local web page over the models (every shipped one by default), until Ctrl-C."""
    from difflab.serve import serve

    return serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype)


def cmd_models(args: argparse.Namespace) -> int:
    """The shipped models: name, what conditions them, sample shape, size and recipe."""
    from difflab.pipelines import read_manifest, shipped_models

    print(f"{'model':<16}{'conditioning':<14}{'sample shape':<14}{'prediction':<12}{'default sampling':<26}size")
    for name, folder in shipped_models().items():
        m = read_manifest(folder)
        size = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**20
        s = m["sample"]
        default = f"{s['sampler']}-{s['steps']}" + (f", w = {s['guidance']}" if m.get("conditioning") else "")
        print(f"{name:<16}{m.get('conditioning') or 'none':<14}{'x'.join(map(str, m['sample_shape'])):<14}"
              f"{m['prediction']:<12}{default:<26}{size:.1f} MB")  # fmt: skip
    return 0


EXPORT_FORMATS = ("difflab", "diffusers")


def cmd_export(args: argparse.Namespace) -> int:
    """Write a model (shipped name, run, model folder or diffusers folder) as a difflab model
    folder or a diffusers folder, with its model card."""
    from difflab.interop import export_diffusers, import_diffusers, is_diffusers_folder
    from difflab.pipelines import MANIFEST_FILE, Pipeline

    out, source = Path(args.out), Path(args.model)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; give a new one")
    _output_dir(out)
    if args.format == "diffusers":
        export_diffusers(args.model, out)
    elif source.is_dir() and is_diffusers_folder(source) and not (source / MANIFEST_FILE).is_file():
        import_diffusers(source, out)  # the converter: the denoiser at the folder's top, as difflab writes it
    else:
        Pipeline.from_pretrained(args.model, device="cpu").save_pretrained(out)
    print(f"wrote {out} ({args.format} model folder with README.md model card)")
    return 0


def int_in(low: int, high: int | None = None, high_text: str | None = None):
    """An argparse type: an integer in [low, high] (never silently replaced by a default)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high_text or high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


positive_int, non_negative_int = int_in(1), int_in(0)
seed_int = int_in(0, 2**63 - 1, "2**63 - 1")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


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

    def device_args(c: argparse.ArgumentParser) -> None:
        c.add_argument("--device", default="auto", help="auto (CUDA where present), cpu, cuda or cuda:N")
        c.add_argument("--dtype", default=None, help="network precision: float32 (default), bf16 or fp16")

    def sampling_args(c: argparse.ArgumentParser, n: int) -> None:
        from difflab.samplers import SAMPLER_ALIASES, SAMPLERS, SPACINGS

        c.add_argument("model", help="run folder, model folder or shipped model name (`difflab models`)")
        c.add_argument("--label", type=non_negative_int, help="class-conditional models: the class (default: cycle)")
        c.add_argument("--guidance", type=finite_float,
                       help="classifier-free guidance weight w (0 = the plain conditional model; default: the model's)")
        c.add_argument("--guidance-scale", type=finite_float,
                       help="the same as diffusers' guidance_scale, which is w + 1 (give this or --guidance)")
        c.add_argument("--sampler", help=f"{', '.join(SAMPLERS)}; aliases {', '.join(SAMPLER_ALIASES)} "
                                         "(default: the model's)")  # fmt: skip
        c.add_argument("--steps", type=positive_int, help="sampler steps, 1 to the model's T (default: the model's)")
        c.add_argument("--spacing", help=f"timestep spacing: {', '.join(SPACINGS)}, 'ddimS' or '10,15,20'")
        c.add_argument("--eta", type=finite_float,
                       help="noise share: ddim (default 0, deterministic), euler_a and dpmpp_2m_sde (default 1)")
        c.add_argument("--n", type=positive_int, default=n, help="number of samples")
        c.add_argument("--seed", type=seed_int, default=0)
        c.add_argument("--batch-size", type=positive_int, default=256, help="samples per network batch")
        device_args(c)

    s = sub.add_parser("sample", help="sample from a model: labelled grid PNG + .npz")
    sampling_args(s, 64)
    s.add_argument("--prompt", action="append", help='text-conditional models: a caption, e.g. "a small red circle '
                                                     'at the top left"; repeat for several (cycled over the samples)')
    s.add_argument("--negative-prompt", help="text-conditional models: steer away from this caption (with --guidance)")
    s.add_argument("--control", metavar="PNG", help="ControlNet models: the control image (a mask or edge map PNG of "
                                                    "the model's size), the same for every sample")  # fmt: skip
    s.add_argument("--control-strength", type=non_negative_float,
                   help="ControlNet models: scale of the control residuals (1 = as trained, 0 = the base model)")
    s.add_argument("--guess-mode", action="store_true", default=None,
                   help="ControlNet models: scale the residuals by level (0.825^k from the middle block outwards)")
    s.add_argument("--stage", action="append", default=[], metavar="K.KEY=VALUE",
                   help="cascades: a setting of stage K (0 = the base): sampler, steps, spacing, eta, guidance, "
                        "thresholding (none, static, dynamic), percentile, aug_level (super-resolution stages)")
    s.add_argument("--variations", metavar="PNG", help="unCLIP models: decode this image's CLIP embedding --n times")
    s.add_argument("--nrow", type=positive_int, help="images per grid row (default: square)")
    s.add_argument("--save-each", action="store_true", help="also one PNG per sample in OUT/images/ (for FID tools)")
    s.add_argument("--out", default="out/samples")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="measure a digits model: digits FD, confident share, class histogram")
    sampling_args(e, 300)
    e.add_argument("--likelihood", choices=("vlb", "ode"), help="also bits/dim of the (8-bit) test digits: vlb = "
                   "the variational bound (T network calls per image), ode = exact through the probability-flow ODE")
    e.add_argument("--nll", action="store_const", const="vlb", dest="likelihood", help="the same as --likelihood vlb")
    e.add_argument("--likelihood-n", type=positive_int, help="test digits to score (default: all 297)")
    e.add_argument("--ode-tol", type=float, default=1e-5, help="rtol = atol of the ODE's adaptive solver")
    e.add_argument("--out", help="write the metrics as JSON here")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="the main job: sample from the shipped models and report their metrics")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--n", type=positive_int, default=100, help="unconditional digits to measure")
    d.add_argument("--seed", type=seed_int, default=0)
    d.add_argument("--train", action="store_true", help="retrain the shipped unconditional model from its recipe first")
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="with --train")
    device_args(d)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=cmd_models)

    x = sub.add_parser("export", help="write a model as a difflab or diffusers folder, with a model card")
    x.add_argument("model", help="shipped name, run folder, model folder or diffusers folder")
    x.add_argument("--out", required=True, help="a new folder")
    x.add_argument("--format", choices=EXPORT_FORMATS, default="difflab",
                   help="difflab (default) or diffusers (unet/ + scheduler/ + model_index.json)")  # fmt: skip
    x.set_defaults(func=cmd_export)

    a = sub.add_parser("cascade", help="join a base model and super-resolution stages into a cascade folder")
    a.add_argument("base", help="the base model: shipped name, run folder or model folder")
    a.add_argument("stages", nargs="+", metavar="STAGE",
                   help="super-resolution stages (runs or model folders), in order")
    a.add_argument("--stage", action="append", default=[], metavar="K.KEY=VALUE",
                   help="the default setting of stage K (as difflab sample --stage), e.g. 1.aug_level=0.2")
    a.add_argument("--out", required=True, help="a new folder")
    a.set_defaults(func=cmd_cascade)

    u = sub.add_parser("unclip", help="join a trained unCLIP prior and decoder into one model folder")
    u.add_argument("prior", help='the prior (task = "unclip_prior"): run or model folder')
    u.add_argument("decoder", help='the decoder (task = "unclip_decoder"): run or model folder')
    u.add_argument("--prior-guidance", type=finite_float, default=1.0, help="the prior's default CFG weight")
    u.add_argument("--out", required=True, help="a new folder")
    u.set_defaults(func=cmd_unclip)

    v = sub.add_parser("serve", help="a local web page to sample from models (http://127.0.0.1:8000/)")
    v.add_argument("model", nargs="*", help="run folders, model folders or shipped names (default: every shipped one)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int_in(0, 65535), default=8000, help="port (0: any free one)")
    device_args(v)
    v.set_defaults(func=cmd_serve)

    c = sub.add_parser("schedules", help="print the noise schedules and plot alpha_bar and log-SNR (PNG)")
    c.add_argument("--T", type=int, default=1000)
    c.add_argument("--out", default="schedules.png")
    c.set_defaults(func=cmd_schedules)
    return p


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Warnings (a damaged checkpoint skipped, an unreadable image) as one line each, like errors."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"difflab {command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with _one_line_warnings(args.command):
            return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad input: a clear message, not a traceback
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission: one line, not a traceback
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
