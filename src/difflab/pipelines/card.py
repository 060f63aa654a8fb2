"""Model cards: the README.md every exported model folder carries, in the Hugging Face form
(YAML front matter the Hub reads: library_name, license, pipeline_tag, tags), then what the
model is, how to sample it, the recipe, how long it trained and what it measured. Everything
comes from the folder itself (manifest, training.json, metrics.json, recipe.toml), so a card
never claims what the folder cannot back up.
"""

from __future__ import annotations

import json
from pathlib import Path

CARD_FILE = "README.md"
LICENSE = "mit"  # difflab's licence, which its recipes' weights share
FORMATS = ("difflab", "diffusers")
CONDITIONING_WORDS = {None: "unconditional", "class": "class-conditional", "text": "text-to-image"}
MAX_RECORD_BYTES = 1 << 20


def card_metadata(manifest: dict, fmt: str = "difflab") -> dict:
    """The front matter: the library that loads this folder's format, the licence, the Hub's
    pipeline tag (images only) and searchable tags."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown model folder format {fmt!r}; allowed: {', '.join(FORMATS)}")
    conditioning = manifest.get("conditioning")
    shape = manifest["latent"]["image_shape"] if manifest.get("latent") else manifest["sample_shape"]
    tags = ["difflab", "diffusion", CONDITIONING_WORDS.get(conditioning, str(conditioning)),
            f"{manifest['prediction']}-prediction"]  # fmt: skip
    if manifest.get("latent") is not None:
        tags.append("latent-diffusion")
    data = (manifest.get("data") or {}).get("name")
    if isinstance(data, str) and data:
        tags.append(data)
    if fmt == "diffusers":
        tags.append("diffusers")
    meta = {"library_name": fmt, "license": LICENSE}
    if len(shape) == 3:  # images (vector models have no Hub pipeline)
        meta["pipeline_tag"] = "text-to-image" if conditioning == "text" else "unconditional-image-generation"
    meta["tags"] = tags
    return meta


def front_matter(meta: dict) -> str:
    """A YAML block of scalars and lists of strings (strings JSON-quoted, which YAML reads)."""
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(str(item))}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join([*lines, "---"]) + "\n"


def read_records(folder: str | Path | None) -> dict:
    """training.json, metrics.json (parsed) and recipe.toml (text) of a folder, where present."""
    records = {}
    if folder is None:
        return records
    for name in ("training.json", "metrics.json", "recipe.toml"):
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
            records[name] = json.loads(text) if name.endswith(".json") else text
        except (OSError, ValueError):  # an unreadable record is left out, not guessed at
            continue
    return records


def model_card(manifest: dict, name: str, fmt: str = "difflab", records: dict | None = None,
               parameters: int | None = None) -> str:  # fmt: skip
    """The whole README.md of a model folder called `name`."""
    records = records or {}
    parts = [front_matter(card_metadata(manifest, fmt)), f"# {name}\n", _summary(manifest, parameters),
             _sampling(manifest, name, fmt), _recipe(manifest, records), _training(records),
             _metrics(records)]  # fmt: skip
    return "\n".join(p for p in parts if p)


def write_model_card(directory: str | Path, manifest: dict, fmt: str = "difflab", source: str | Path | None = None,
                     parameters: int | None = None) -> Path:  # fmt: skip
    """Write `directory`/README.md; the records are read from `source` (default: `directory`)."""
    directory = Path(directory)
    records = read_records(source if source is not None else directory)
    path = directory / CARD_FILE
    path.write_text(model_card(manifest, directory.resolve().name, fmt, records, parameters), encoding="utf-8")
    return path


def _summary(manifest: dict, parameters: int | None) -> str:
    shape = manifest["latent"]["image_shape"] if manifest.get("latent") else manifest["sample_shape"]
    data = (manifest.get("data") or {}).get("name") or "unrecorded data"
    what = CONDITIONING_WORDS.get(manifest.get("conditioning"), "conditional")
    size = f", {parameters / 1e6:.2f}M parameters" if parameters else ""
    latent = " in the latent space of its autoencoder" if manifest.get("latent") else ""
    article = "An" if what[0] in "aeiou" else "A"
    return (f"{article} {what} diffusion model of {'x'.join(map(str, shape))} samples ({data}){latent}, trained with "
            f"difflab{size}.\n")  # fmt: skip


def _sampling(manifest: dict, name: str, fmt: str) -> str:
    condition = {"class": ", label=3", "text": ', prompt="a big blue square at the top left"'}.get(
        manifest.get("conditioning"), "")
    flag = {"class": " --label 3", "text": ' --prompt "a big blue square at the top left"'}.get(
        manifest.get("conditioning"), "")
    text = ["## Sampling\n", "With difflab (the folder that holds this card):\n", "```python", "import difflab", "",
            f'pipe = difflab.Pipeline.from_pretrained("{name}")', f"images = pipe(n=16, seed=0{condition})",
            "```", "", "```bash", f"difflab sample {name} --n 16{flag}", "```", ""]  # fmt: skip
    if fmt == "diffusers" and manifest.get("conditioning") is None:
        ddpm = manifest["sample"]["sampler"] == "ddpm"
        pipeline = "DDPMPipeline" if ddpm else "DDIMPipeline"
        # difflab recomputes eps from a thresholded x0; diffusers' DDIM does so only when asked
        clipped = ", use_clipped_model_output=True" if not ddpm and manifest.get("thresholding") != "none" else ""
        text += ["With diffusers:\n", "```python", f"from diffusers import {pipeline}", "",
                 f'pipe = {pipeline}.from_pretrained("{name}")', f"images = pipe(batch_size=16{clipped}).images",
                 "```", ""]  # fmt: skip
    elif fmt == "diffusers":
        shape = ", ".join(map(str, manifest["sample_shape"]))
        text += ["With diffusers, the network is a `UNet2DModel` that takes `class_labels` (label "
                 f"{manifest.get('num_classes')} is the null label of classifier-free guidance); no diffusers "
                 "pipeline passes labels, so drive `DDIMScheduler` in a loop:\n", "```python",
                 "import torch", "from diffusers import DDIMScheduler, UNet2DModel", "",
                 f'unet = UNet2DModel.from_pretrained("{name}", subfolder="unet")',
                 f'scheduler = DDIMScheduler.from_pretrained("{name}", subfolder="scheduler")',
                 "scheduler.set_timesteps(50)", f"x = torch.randn(8, {shape})", "labels = torch.full((8,), 3)",
                 "for t in scheduler.timesteps:",
                 "    eps = unet(x, t, class_labels=labels).sample",
                 "    x = scheduler.step(eps, t, x, use_clipped_model_output=True).prev_sample", "```",
                 ""]  # fmt: skip
    sample = manifest["sample"]
    guidance = f", guidance w = {sample.get('guidance')}" if manifest.get("conditioning") else ""
    text.append(f"Defaults: {sample['sampler']} with {sample['steps']} steps{guidance}; x0 thresholding "
                f"{manifest.get('thresholding', 'none')}.\n")  # fmt: skip
    return "\n".join(text)


def _recipe(manifest: dict, records: dict) -> str:
    schedule = manifest["schedule"]
    described = schedule.get("name", schedule.get("kind")) if isinstance(schedule, dict) else "?"
    steps = schedule.get("T") if isinstance(schedule, dict) else None
    lines = ["## Recipe\n", f"- schedule: {described}" + (f", T = {steps}" if steps else ""),
             f"- parameterisation: {manifest['prediction']}, variance {manifest.get('variance', 'fixed_small')}"]
    training = records.get("training.json")
    if isinstance(training, dict) and training.get("recipe"):
        lines.append(f"- recipe: `{training['recipe']}`" + (" (resolved: `recipe.toml` beside the weights)"
                                                            if "recipe.toml" in records else ""))  # fmt: skip
    elif "recipe.toml" in records:
        lines.append("- recipe: `recipe.toml` beside the weights")
    else:
        lines.append("- recipe: not recorded")
    return "\n".join(lines) + "\n"


def _training(records: dict) -> str:
    training = records.get("training.json")
    if not isinstance(training, dict):
        return "## Training\n\nNot recorded in this folder.\n"
    lines = ["## Training\n"]
    if "steps" in training:
        lines.append(f"- steps: {training['steps']:,}" if isinstance(training["steps"], int) else
                     f"- steps: {training['steps']}")  # fmt: skip
    seconds = training.get("wall_seconds")
    if isinstance(seconds, int | float):
        lines.append(f"- wall time: {seconds / 60:.0f} minutes")
    for key in ("machine", "command", "final_loss", "note"):
        if key in training:
            lines.append(f"- {key.replace('_', ' ')}: {training[key]}")
    return "\n".join(lines) + "\n"


def _metrics(records: dict) -> str:
    metrics = records.get("metrics.json")
    if not isinstance(metrics, dict) or not metrics:
        return ""
    rows = ["## Metrics\n", "Measured on this model (metrics.json):\n", "| metric | value |", "|---|---|"]
    rows += [f"| {key} | {_number(value)} |" for key, value in _flatten(metrics)]
    return "\n".join(rows) + "\n"


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            yield f"{prefix}{key}", value


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
