"""Latent diffusion benchmark: how good the autoencoders are, and what diffusing in their latent
space buys over pixels.

1. Autoencoders (each --autoencoder RUN, e.g. KL and VQ at f = 4 and 8): on the first n 64x64
   test scenes, reconstruction PSNR, rFD (Frechet distance between reconstructions and the
   originals in the attribute classifier's feature space, with the real-data floor beside it),
   whether the attribute classifier still reads the caption's attributes off the reconstruction,
   codebook usage and perplexity (VQ), and encode+decode images/s.
2. Pixel vs latent text-to-image (--pixel-model, --latent-model, trained for about the same wall
   time): training steps/s (from each run's log), parameters, sampling images/s (decoding
   included), attribute accuracy and attribute FD of samples for the captions of the test scenes.
   Goal: latent sampling >= 4x faster with attribute accuracy no worse.

    python benchmarks/latent.py --attribute-classifier runs/shapes-attributes \\
        --autoencoder runs/shapes-kl-f4 runs/shapes-kl-f8 runs/shapes-vq-f4 runs/shapes-vq-f8 \\
        --pixel-model runs/shapes64-text --latent-model runs/shapes-ldm-text [--n 200] [--guidance 3]

Writes benchmarks/results/latent.json and latent.png (reconstructions; samples of both models).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from difflab.data.images import save_grid
from difflab.eval.report import sample_batched
from difflab.eval.shapes import ShapesJudge
from difflab.guidance import conditioned
from difflab.methods.latent import load_autoencoder, psnr
from difflab.train import load_decoder, load_pipeline
from difflab.train.monitor import read_log
from difflab.train.tasks import load_classifier

RESULTS = Path(__file__).resolve().parent / "results"


def print_row(row: dict) -> None:
    print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


@torch.no_grad()
def autoencoder_row(path: Path, images: torch.Tensor, judge: ShapesJudge, batch_size: int) -> tuple[dict, torch.Tensor]:
    autoencoder = load_autoencoder(path)
    cfg = autoencoder.config
    start = time.perf_counter()
    latents = torch.cat([autoencoder.latent(x) for x in images.split(batch_size)])
    recon = torch.cat([autoencoder.decode(z) for z in latents.split(batch_size)]).clamp(-1, 1)
    seconds = time.perf_counter() - start
    scores = judge(recon)
    row = {
        "run": str(path),
        "regularization": cfg.regularization,
        "f": autoencoder.downsampling_factor,
        "latent_shape": list(latents.shape[1:]),
        "compression": images[0].numel() / latents[0].numel(),
        "parameters": sum(p.numel() for p in autoencoder.parameters()),
        "psnr_db": float(psnr(images, recon).mean()),
        "rfd": scores["attribute_fd"],
        "attribute_accuracy": scores["accuracy"],
        "images_per_second": len(images) / seconds,
    }
    if cfg.regularization == "vq":
        q = autoencoder.quantize(latents)
        row.update(codebook_usage=float(q.usage), perplexity=float(q.perplexity), num_codes=cfg.num_codes)
    print_row(row)
    return row, recon


def training_speed(run: Path) -> dict:
    """Steps/s of the run's last log line (steps since the process started / its wall time)."""
    last = read_log(run)[-1]
    return {"steps": last["step"], "steps_per_second": last["it_s"], "wall_seconds": last["step"] / last["it_s"]}


def diffusion_row(path: Path, judge: ShapesJudge, args) -> tuple[dict, torch.Tensor]:
    denoiser, meta = load_pipeline(path)
    decode = load_decoder(path)
    guided, cond = conditioned(denoiser, meta, len(judge.prompts), scale=args.guidance, prompt=judge.prompts)
    start = time.perf_counter()
    x = sample_batched(guided, len(judge.prompts), args.sampler, args.steps, args.seed, cond=cond,
                       batch_size=args.batch_size, decode=decode)  # fmt: skip
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in denoiser.net.parameters())
    row = {
        "run": str(path),
        "space": "pixel" if decode is None else "latent",
        "sample_shape": meta["sample_shape"],
        "parameters": parameters,
        **training_speed(path),
        "sampling_images_per_second": len(x) / seconds,
        **judge(x),
    }
    print_row(row)
    return row, x.clamp(-1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attribute-classifier", type=Path, required=True, help="configs/shapes-attributes.toml run")
    p.add_argument("--autoencoder", type=Path, nargs="*", default=[], help="autoencoder runs to measure")
    p.add_argument("--pixel-model", type=Path, help="configs/shapes64-text.toml run")
    p.add_argument("--latent-model", type=Path, help="configs/shapes-ldm-text.toml run")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=200, help="test scenes / prompts")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "latent.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    classifier, _ = load_classifier(args.attribute_classifier)
    judge = ShapesJudge.for_test_scenes(classifier, args.n, args.size)
    images = judge.real  # the prompts' own scenes: the autoencoders reconstruct them
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "autoencoder"},
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads",
        "real_floor": judge.real_floor(),
    }
    pictures = [images[:8]]
    if args.autoencoder:
        rows = []
        for path in args.autoencoder:
            row, recon = autoencoder_row(path, images, judge, args.batch_size)
            rows.append(row)
            pictures.append(recon[:8])
        result["autoencoders"] = rows
    models = {}
    for name, path in (("pixel", args.pixel_model), ("latent", args.latent_model)):
        if path is not None:
            models[name], x = diffusion_row(path, judge, args)
            pictures.append(x[:8])
    if models:
        result["diffusion"] = models
    if len(models) == 2:
        pixel, latent = models["pixel"], models["latent"]
        result["latent_vs_pixel"] = {
            "sampling_speedup": latent["sampling_images_per_second"] / pixel["sampling_images_per_second"],
            "training_step_speedup": latent["steps_per_second"] / pixel["steps_per_second"],
            "accuracy_difference": latent["accuracy"] - pixel["accuracy"],
        }
        print(result["latent_vs_pixel"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    save_grid(torch.cat(pictures), args.out.with_suffix(".png"), nrow=8)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} (rows: originals, "
          f"{len(args.autoencoder)} reconstructions, {' and '.join(models) or 'no'} samples)")  # fmt: skip


if __name__ == "__main__":
    main()
