"""unCLIP benchmark (Ramesh et al. 2022) on 32x32 captioned shapes, each part measured where its
run exists (a missing run skips its sections):

  - encoder: held-out caption -> image top-1 retrieval (an image with the same caption counts as
    a hit; gate >= 90%), over the first --n test scenes;
  - prior: mean cosine(sampled, true image embedding) on held-out captions (goal >= 0.8), with
    the text embedding's own cosine to the image as a reference;
  - text -> prior -> decoder: the attribute judge's accuracy (every attribute of the prompt right;
    goal >= 80%) against the direct text-conditional model, with both runs' training times;
  - variations: --variations images decoded from each of the first test scenes' embeddings: the
    share with every attribute of the source kept (goal >= 90%) and the mean pixel distance
    (RMS, images in [-1, 1]) to the source, which must not be 0 (a copy is not a variation),
    beside that distance between real scenes sharing a caption (0 here: a caption fixes a scene).

    python benchmarks/unclip.py --clip runs/shapes-clip --prior runs/shapes-prior \\
        --decoder runs/shapes-decoder --text-model runs/shapes-text [--n 200] [--steps 50]
    python benchmarks/unclip.py ... --quick          # smoke run: 8 prompts, 3 steps

Writes benchmarks/results/unclip.json and unclip.png (prompts with unCLIP's and the direct
model's samples; a row of variations). Models come from configs/shapes-clip.toml,
shapes-prior.toml, shapes-decoder.toml and shapes-text.toml; the judge is the shipped shapes-judge.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.data import get_dataset
from difflab.eval.report import sample_batched
from difflab.eval.shapes import ShapesJudge
from difflab.guidance import conditioned
from difflab.methods.unclip import prior_condition, sample_prior
from difflab.nets.clip import retrieval_top1, same_caption
from difflab.pipelines.folder import read_manifest, resolve
from difflab.pipelines.unclip import UnCLIPPipeline
from difflab.train import load_pipeline
from difflab.train.tasks import load_classifier
from difflab.train.tasks.contrastive import load_clip

RESULTS = Path(__file__).resolve().parent / "results"


def exists(path: str) -> bool:
    """Whether `path` is a diffusion model (run or model folder) that can be loaded."""
    try:
        read_manifest(resolve(path))
        return True
    except ValueError:
        return False


def maybe_clip(path: str):
    try:
        return load_clip(path)
    except ValueError:
        return None


def training_seconds(run: str) -> float | None:
    path = resolve(run) / "training.json"
    return json.loads(path.read_text(encoding="utf-8")).get("wall_seconds") if path.is_file() else None


def test_scenes(n: int) -> tuple[list[str], torch.Tensor]:
    test = get_dataset("shapes", "test", size=32, n=max(n, 2))
    items = [test[i] for i in range(n)]
    return [it["caption"] for it in items], torch.stack([it["x"] for it in items])


def same_caption_rms(n: int = 2000) -> float:
    """Mean pixel RMS between real test scenes that share a caption: how far a variation that
    keeps every attribute can differ from its source in this data (0: a caption fixes the scene)."""
    captions, images = test_scenes(n)
    groups: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        groups.setdefault(caption, []).append(i)
    pairs = [(a, b) for idx in groups.values() for k, a in enumerate(idx) for b in idx[k + 1 :]]
    return sum(float((images[a] - images[b]).pow(2).mean().sqrt()) for a, b in pairs) / max(len(pairs), 1)


@torch.no_grad()
def retrieval(clip, captions: list[str], images: torch.Tensor) -> dict:
    text, image = clip.encode_text(captions), clip.encode_image(images)
    return {"top1": retrieval_top1(text, image, same_caption(captions)), "n": len(captions), "gate": 0.9}


@torch.no_grad()
def prior_cosine(clip, prior, captions, images, args) -> dict:
    true = clip.encode_image(images)
    sampled = sample_prior(prior, clip, captions, guidance=args.prior_guidance, draws=2, steps=args.prior_steps,
                           generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    text = prior_condition(clip, captions)["text_embed"]
    return {"cosine": float(F.cosine_similarity(sampled, true).mean()),
            "text_embedding_cosine": float(F.cosine_similarity(text, true).mean()), "goal": 0.8}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default="runs/shapes-clip")
    p.add_argument("--prior", default="runs/shapes-prior")
    p.add_argument("--decoder", default="runs/shapes-decoder")
    p.add_argument("--text-model", default="runs/shapes-text")
    p.add_argument("--attribute-classifier", default="shapes-judge")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prior-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--prior-guidance", type=float, default=1.0)
    p.add_argument("--variations", type=int, default=4, help="variations per source image")
    p.add_argument("--sources", type=int, default=25, help="source images for the variations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.quick:
        args.n, args.steps, args.prior_steps, args.sources, args.variations = 8, 3, 3, 2, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": platform.platform(), "settings": vars(args), "skipped": []}
    captions, images = test_scenes(args.n)
    grids = []

    clip = maybe_clip(args.clip)
    if clip is None:
        results["skipped"].append(f"encoder, prior, decoder: no encoder at {args.clip}")
    else:
        results["encoder"] = retrieval(clip, captions, images)
        print("encoder", results["encoder"])

    prior = None
    if clip is not None and exists(args.prior):
        prior, _ = load_pipeline(args.prior)
        results["prior"] = prior_cosine(clip, prior, captions, images, args)
        print("prior", results["prior"])
    elif clip is not None:
        results["skipped"].append(f"prior: no run at {args.prior}")

    judge_path = Path(args.attribute_classifier)
    if not judge_path.exists():  # a shipped classifier's name
        from difflab.pretrained import ROOT

        judge_path = ROOT / args.attribute_classifier
    judge_net, _ = load_classifier(judge_path)
    judge = ShapesJudge(judge_net, captions, images)
    results["real_floor"] = {"accuracy": judge(images)["accuracy"]}

    if prior is not None and exists(args.decoder):
        decoder, manifest = load_pipeline(args.decoder)
        settings = {"role": "unclip", "draws": 2, "prior_guidance": args.prior_guidance,
                    "prior_steps": args.prior_steps, "captions": manifest["unclip"]["captions"]}  # fmt: skip
        pipe = UnCLIPPipeline(clip, prior, decoder, {**manifest, "unclip": settings})
        start = time.perf_counter()
        x = pipe.generate(len(captions), prompt=captions, guidance=args.guidance, steps=args.steps, seed=args.seed)
        results["unclip"] = {**judge(x), "sampling_seconds": time.perf_counter() - start, "goal": 0.8,
                             "training_seconds": {"prior": training_seconds(args.prior),
                                                  "decoder": training_seconds(args.decoder)}}  # fmt: skip
        grids.append(("unCLIP", x[:8]))
        src_caps, src = captions[: args.sources], images[: args.sources]
        kept, distances, rows, per_attribute = [], [], [], {}
        for i in range(len(src)):
            v = pipe.variations(src[i], args.variations, guidance=args.guidance, steps=args.steps, seed=args.seed + i)
            scores = ShapesJudge(judge_net, [src_caps[i]] * len(v), src[i : i + 1].expand(len(v), -1, -1, -1))(v)
            kept.append(scores["accuracy"])
            for key in (k for k in scores if k.startswith("acc_")):  # which attribute a variation loses
                per_attribute.setdefault(key, []).append(scores[key])
            distances.append(float((v - src[i]).pow(2).mean((1, 2, 3)).sqrt().mean()))
            rows.append(torch.cat([src[i : i + 1], v]))
        results["variations"] = {
            "attributes_kept": sum(kept) / len(kept), "mean_pixel_rms": sum(distances) / len(distances),
            "sources": len(src), "per_source": args.variations, "goal": 0.9,
            **{key: sum(v) / len(v) for key, v in per_attribute.items()},
            "real_same_caption_rms": same_caption_rms(),
        }  # fmt: skip
        grids.append(("variations", torch.cat(rows[:2])))
        print("unclip", results["unclip"], "variations", results["variations"])
    else:
        results["skipped"].append(f"text -> prior -> decoder and variations: no decoder at {args.decoder} or no prior")

    if exists(args.text_model):
        denoiser, meta = load_pipeline(args.text_model)
        start = time.perf_counter()
        den, cond = conditioned(denoiser, meta, len(captions), scale=args.guidance, prompt=captions)
        x = sample_batched(den, len(captions), "ddim", args.steps, args.seed, cond=cond).clamp(-1, 1)
        results["direct"] = {**judge(x), "sampling_seconds": time.perf_counter() - start,
                             "training_seconds": training_seconds(args.text_model)}  # fmt: skip
        grids.append(("direct text model", x[:8]))
        print("direct", results["direct"])
    else:
        results["skipped"].append(f"direct text model: no run at {args.text_model}")

    (out / "unclip.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if grids:
        from difflab.viz import save_labelled_grid

        labels = [name for name, x in grids for _ in range(len(x))]
        save_labelled_grid(torch.cat([x for _, x in grids]), out / "unclip.png", labels, nrow=8)
    print(f"wrote {out / 'unclip.json'}")


if __name__ == "__main__":
    main()
