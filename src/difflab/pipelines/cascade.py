"""Cascades (Ho et al. 2021; Imagen): a base model followed by super-resolution stages, each
with its own sampler, steps, guidance, thresholding and augmentation level.

A cascade folder is a model folder whose manifest is its base's (so a tool that knows nothing of
cascades sees the base model) plus a "cascade" entry: the list of stages, each a component
(a complete model folder, stage-0 the base) and the settings it samples with:

    "cascade": {"stages": [
        {"component": "stage-0", "sample": {"sampler": "ddim", "steps": 50, "guidance": 3.0,
                                            "thresholding": "dynamic", "percentile": 0.995}},
        {"component": "stage-1", "sample": {"steps": 25, "guidance": 1.0, "aug_level": 0.1}}]}

Settings a stage does not give are its own model's defaults (its manifest's "sample", its
thresholding, its "superres" aug_level). `difflab cascade BASE SR1 [SR2 ...] --out DIR` writes
one; `Pipeline.from_pretrained(DIR)` loads it as a `CascadePipeline` and `difflab sample DIR`
writes every stage's grid.

Sampling: stage k draws its samples from its own generators (stage 0 from exactly those of
``Pipeline.generate(seed=...)``, so the base grid is the base model's). A super-resolution stage
takes the previous stage's output z: non-truncated ("noise"), z is noised to level s on the
stage's augmentation schedule; truncated, the previous stage's chain is stopped at step s and
its state is z_s (`difflab.methods.cascade`). Either way z_s, resized up, and s are given to
the stage's network, with the label or prompt of every conditional stage.
"""

from __future__ import annotations

import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from difflab.data.resize import UPSAMPLE_MODES
from difflab.denoiser import DEFAULT_PERCENTILE, THRESHOLDINGS
from difflab.guidance import check_scale, conditioned
from difflab.methods.cascade import (
    AUG_LEVEL,
    AUGMENTATIONS,
    TRUNCATABLE_SAMPLERS,
    check_level,
    grid_step,
    noised_condition,
    sample_until,
    superres_condition,
)
from difflab.pipelines.folder import component_dir, new_manifest, read_manifest, resolve, write_manifest
from difflab.pipelines.pipeline import Pipeline, as_images, check_output_type
from difflab.pipelines.sampling import sample_seeds
from difflab.schedules import Schedule
from difflab.seeds import derive_seed

STAGE_KEYS = ("sampler", "steps", "spacing", "eta", "guidance", "thresholding", "percentile", "aug_level")
COMMON_KEYS = ("sampler", "steps", "spacing", "eta", "guidance")  # call options that apply to every stage


def stage_component(k: int) -> str:
    return f"stage-{k}"


def is_cascade(manifest: dict) -> bool:
    return manifest.get("cascade") is not None


# ---------------------------------------------------------------- manifest checks
def check_cascade_entries(manifest: dict, where) -> None:
    """The "superres" and "cascade" entries of a manifest, checked before anything is built."""
    sr = manifest.get("superres")
    if sr is not None:
        check_superres_entry(sr, where)
    spec = manifest.get("cascade")
    if spec is None:
        return
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not isinstance(stages, list) or len(stages) < 2:
        raise ValueError(f"{where}: cascade must be {{'stages': [...]}} with a base and at least one stage after it")
    for k, entry in enumerate(stages):
        if not isinstance(entry, dict) or entry.get("component") not in manifest["components"]:
            names = sorted(manifest["components"])
            raise ValueError(f"{where}: cascade stage {k} must name one of the components {names}")
        settings = entry.get("sample", {})
        unknown = sorted(set(settings) - set(STAGE_KEYS)) if isinstance(settings, dict) else None
        if unknown is None or unknown:
            raise ValueError(f"{where}: cascade stage {k} has unknown sample settings {unknown}; allowed: {STAGE_KEYS}")


def check_superres_entry(sr, where) -> None:
    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            value = sr.get(key) if isinstance(sr, dict) else sr
            raise ValueError(f"{where}: superres {key} = {value!r} is not allowed; expected {allowed}")

    need(isinstance(sr, dict), "entry", "a dict")
    for key in ("low_size", "channels"):
        value = sr.get(key)
        need(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096, key, "an int in [1, 4096]")
    need(sr.get("upsample") in UPSAMPLE_MODES, "upsample", f"one of {', '.join(UPSAMPLE_MODES)}")
    need(sr.get("augmentation") in AUGMENTATIONS, "augmentation", f"one of {', '.join(AUGMENTATIONS)}")
    level = sr.get("aug_level", 0.0)
    need(isinstance(level, int | float) and not isinstance(level, bool) and 0 <= level <= 1, "aug_level", "in [0, 1]")
    need(isinstance(sr.get("aug_level_input", True), bool), "aug_level_input", "true or false")
    if sr["augmentation"] != "none":
        try:
            Schedule.from_config(sr.get("aug_schedule"))
        except (ValueError, TypeError, AttributeError, KeyError):
            need(False, "aug_schedule", "a schedule config (Schedule.to_config())")


# ---------------------------------------------------------------- settings
def stage_defaults(manifest: dict) -> dict:
    """A stage's own default settings: its manifest's sampling defaults, thresholding and level."""
    s = manifest["sample"]
    settings = {
        "sampler": s.get("sampler", "ddim"),
        "steps": s.get("steps", 50),
        "spacing": s.get("spacing"),
        "eta": s.get("eta", 0.0),
        "guidance": s.get("guidance", 0.0) if manifest.get("conditioning") else 0.0,
        "thresholding": manifest.get("thresholding", "none"),
        "percentile": manifest.get("thresholding_percentile", DEFAULT_PERCENTILE),
    }
    if manifest.get("superres") is not None:
        settings["aug_level"] = manifest["superres"].get("aug_level", 0.0)
    return settings


def parse_stage_override(text: str) -> tuple[int, str, object]:
    """'1.aug_level=0.2' -> (1, 'aug_level', 0.2): stage index, setting, value (a TOML literal,
    else the raw string, so `0.sampler=ddpm` needs no quotes)."""
    key, sep, value = text.partition("=")
    index, dot, name = key.strip().partition(".")
    if not sep or not dot or not index.strip().isdigit() or name not in STAGE_KEYS:
        raise ValueError(f"a stage setting must look like K.KEY=VALUE with KEY one of {', '.join(STAGE_KEYS)}, "
                         f"got {text!r}")  # fmt: skip
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return int(index), name, parsed


def stage_overrides(items: Sequence[str] | dict | Sequence[dict] | None, count: int) -> list[dict]:
    """Per-stage setting overrides from 'K.KEY=VALUE' strings, {K: {...}} or a list of dicts."""
    out: list[dict] = [{} for _ in range(count)]
    if not items:
        return out
    if isinstance(items, dict):
        pairs = list(items.items())
    elif all(isinstance(item, str) for item in items):
        pairs = []
        for item in items:
            k, name, value = parse_stage_override(item)
            pairs.append((k, {name: value}))
    else:
        pairs = list(enumerate(items))
    for k, values in pairs:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < count:
            raise ValueError(f"stage {k!r} does not exist; this cascade has stages 0 to {count - 1}")
        if not isinstance(values, dict):
            raise ValueError(f"the settings of stage {k} must be a dict, got {values!r}")
        out[k].update(values)
    return out


# ---------------------------------------------------------------- the pipeline
class CascadePipeline:
    """Stages (each a `Pipeline`: base first, then super-resolution stages) and their settings;
    ``generate_stages`` returns every stage's samples, ``generate``/``__call__`` the last's."""

    def __init__(self, stages: Sequence[Pipeline], settings: Sequence[dict] | None = None,
                 manifest: dict | None = None, source=None):  # fmt: skip
        self.stages = list(stages)
        if len(self.stages) < 2:
            raise ValueError("a cascade needs a base and at least one super-resolution stage")
        check_stages(self.stages)
        given = list(settings) if settings is not None else [{} for _ in self.stages]
        if len(given) != len(self.stages):
            raise ValueError(f"got settings for {len(given)} stages but the cascade has {len(self.stages)}")
        self.settings = [{**stage_defaults(p.manifest), **dict(s)} for p, s in zip(self.stages, given)]
        self.resolve(self.settings)  # a clear error now, not at the first call
        self.manifest = manifest if manifest is not None else cascade_manifest(self.stages, self.settings)
        self.source = None if source is None else Path(source)

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = None) -> CascadePipeline:  # fmt: skip
        """A cascade folder (written by `difflab cascade` or `save_pretrained`)."""
        directory = resolve(model)
        manifest = read_manifest(directory)
        if not is_cascade(manifest):
            raise ValueError(f"{directory} is not a cascade (its manifest has no 'cascade' entry)")
        entries = manifest["cascade"]["stages"]
        stages = [Pipeline.from_pretrained(component_dir(directory, manifest, e["component"]), device, dtype)
                  for e in entries]  # fmt: skip
        return cls(stages, [e.get("sample", {}) for e in entries], manifest, directory)

    @classmethod
    def from_stages(cls, models: Sequence[str | Path], settings: Sequence[dict] | None = None,
                    device: str | torch.device | None = "auto", dtype=None) -> CascadePipeline:  # fmt: skip
        """A cascade of trained models (shipped names, runs or model folders), base first."""
        return cls([Pipeline.from_pretrained(m, device, dtype) for m in models], settings)

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.stages[-1].device

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.stages[-1].output_shape

    @property
    def conditioning(self) -> str | None:
        kinds = [p.conditioning for p in self.stages if p.conditioning]
        return kinds[0] if kinds else None

    def to(self, device=None, dtype=None) -> CascadePipeline:
        for stage in self.stages:
            stage.to(device, dtype)
        return self

    # ---------------------------------------------------------------- settings
    def resolve(self, settings: Sequence[dict]) -> list[dict]:
        """Each stage's settings checked against its model: (sampler, timesteps, options, settings)."""
        from difflab.samplers import resolve_sampler, sampling_plan

        plans = []
        for k, (pipe, s) in enumerate(zip(self.stages, settings)):
            unknown = sorted(set(s) - set(STAGE_KEYS))
            if unknown:
                raise ValueError(f"stage {k}: unknown setting(s) {unknown}; allowed: {', '.join(STAGE_KEYS)}")
            where = f"stage {k} ({pipe.source or 'in memory'})"
            try:
                sampler, spacing = resolve_sampler(s["sampler"], s.get("spacing"))
                plan = sampling_plan(pipe.denoiser.schedule, sampler, s["steps"], s.get("eta"), spacing)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{where}: {error}") from None
            if s["thresholding"] not in THRESHOLDINGS:
                raise ValueError(f"{where}: thresholding = {s['thresholding']!r}; allowed: {', '.join(THRESHOLDINGS)}")
            p = s["percentile"]
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
                raise ValueError(f"{where}: percentile = {p!r} must lie in (0, 1]")
            check_scale(s["guidance"])
            if s["guidance"] != 0 and not pipe.conditioning:
                raise ValueError(f"{where}: guidance = {s['guidance']} but this stage is unconditional; expected 0")
            sr = pipe.manifest.get("superres")
            if sr is None and "aug_level" in s:
                raise ValueError(f"{where}: aug_level is a setting of super-resolution stages, not of the base")
            if sr is not None:
                check_level(s["aug_level"], f"stage {k} aug_level")
                if sr["augmentation"] == "none" and s["aug_level"] != 0:
                    raise ValueError(f"{where}: aug_level = {s['aug_level']} but this stage was trained without "
                                     "augmentation; expected 0")  # fmt: skip
                if sr["augmentation"] == "truncated":
                    previous = self.stages[k - 1]
                    grid_step(s["aug_level"], previous.denoiser.schedule.T, f"stage {k} aug_level")
                    if plans[k - 1][0] not in TRUNCATABLE_SAMPLERS:
                        raise ValueError(
                            f"stage {k} is truncated: stage {k - 1}'s chain is stopped at step s, which its sampler "
                            f"{plans[k - 1][0]!r} cannot do; use one of {', '.join(TRUNCATABLE_SAMPLERS)}"
                        )
            plans.append((*plan, s))
        return plans

    def call_settings(self, stages=None, **common) -> list[dict]:
        """The settings of one call: each stage's, then `common` options (given ones, to every
        stage; guidance to the conditional ones), then the per-stage `stages` overrides."""
        unknown = sorted(set(common) - set(COMMON_KEYS))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; every stage takes {', '.join(COMMON_KEYS)}")
        overrides = stage_overrides(stages, len(self.stages))
        out = []
        for pipe, own, extra in zip(self.stages, self.settings, overrides):
            given = {k: v for k, v in common.items() if v is not None and (k != "guidance" or pipe.conditioning)}
            if "sampler" in given and "spacing" not in given:
                given["spacing"] = None  # a new sampler brings its own spacing
            out.append({**own, **given, **extra})
        return out

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate_stages(
        self,
        n: int = 16,
        *,
        label: int | Sequence[int] | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        stages: Sequence[str] | dict | Sequence[dict] | None = None,
        batch_size: int = 256,
        progress: bool = False,
        low_res: Tensor | None = None,
        **common,
    ) -> list[Tensor]:
        """Every stage's n samples (float32, CPU): the base's, then each super-resolution
        stage's. A stage whose next stage is truncated returns its chain's state at step s (what
        it feeds on), not a clean sample. `label`/`prompt` go to every conditional stage; `common`
        (sampler, steps, spacing, eta, guidance) to every stage; `stages` sets one stage's
        settings: ["1.aug_level=0.3"], {1: {"aug_level": 0.3}} or one dict per stage.
        `low_res`: n images to start from instead of the base's samples (returned as stage 0's):
        the first super-resolution stage noises them to its level s on its augmentation schedule,
        truncated or not (an image has no chain to stop), e.g. real images downsampled."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (number of samples) must be an integer >= 1, got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if low_res is not None:
            expected = (n, *self.stages[0].output_shape)
            if not isinstance(low_res, Tensor) or tuple(low_res.shape) != expected:
                got = tuple(low_res.shape) if isinstance(low_res, Tensor) else type(low_res).__name__
                raise ValueError(f"low_res must be a tensor of shape {expected} (the base's samples), got {got}")
        plans = self.resolve(self.call_settings(stages, **common))
        seeds = [seed] + [derive_seed(seed, k) for k in range(1, len(self.stages))]
        outputs: list[Tensor] = []
        previous = None
        for k, pipe in enumerate(self.stages):
            if k == 0 and low_res is not None:
                previous = low_res.detach().float().cpu()
                outputs.append(previous)
                continue
            generators = [torch.Generator().manual_seed(s) for s in sample_seeds(seeds[k], n)]
            stop = -1
            nxt = self.stages[k + 1].manifest["superres"] if k + 1 < len(self.stages) else None
            if nxt is not None and nxt["augmentation"] == "truncated":
                stop = grid_step(plans[k + 1][3]["aug_level"], pipe.denoiser.schedule.T)
            given = low_res is not None and k == 1  # a given image is noised as q(z_s | z), as in training
            previous = self.sample_stage(k, n, plans[k], previous, generators, stop, label, prompt, negative_prompt,
                                         batch_size, progress, noise_input=given)  # fmt: skip
            outputs.append(previous)
        return outputs

    def sample_stage(self, k, n, plan, previous, generators, stop, label, prompt, negative_prompt, batch_size,
                     progress, noise_input: bool = False) -> Tensor:  # fmt: skip
        from difflab.samplers import randn

        pipe = self.stages[k]
        sampler, timesteps, options, s = plan
        meta = {**pipe.manifest, "thresholding": s["thresholding"], "thresholding_percentile": s["percentile"]}
        kind = pipe.conditioning
        given = {"label": label} if kind == "class" else {}
        if kind == "text":
            if prompt is None:
                raise ValueError(f"stage {k} is text-conditional: give a prompt")
            given = {"prompt": prompt, "negative_prompt": negative_prompt}
        denoiser, cond = conditioned(pipe.denoiser, meta, n, scale=s["guidance"] if kind else 0.0, **given)
        device = pipe.device
        sr = pipe.manifest.get("superres")
        if sr is not None:
            z = previous
            if sr["augmentation"] == "noise" or (noise_input and sr["augmentation"] == "truncated"):
                # drawn at every level, so the chain's noise does not depend on s
                noise = randn(z.shape, generators, dtype=z.dtype)
                z = noised_condition(z, s["aug_level"], Schedule.from_config(sr["aug_schedule"]), noise)
            size = pipe.denoiser.sample_shape[-1]
            extra = superres_condition(z.to(device), s["aug_level"], size, sr["upsample"])
            if not sr.get("aug_level_input", True):  # a stage trained without augmentation nor the level input
                del extra[AUG_LEVEL]
            cond = {**(cond or {}), **extra}
        shape = tuple(pipe.denoiser.sample_shape)
        terminal, started = sys.stderr.isatty(), time.perf_counter()
        out = []
        for start in range(0, n, batch_size):
            end = min(n, start + batch_size)
            gens = generators[start:end]
            batch_cond = None if cond is None else {key: v[start:end] for key, v in cond.items()}
            x_T = randn((end - start, *shape), gens, dtype=torch.get_default_dtype(), device=device)
            x = sample_until(denoiser, x_T, timesteps, stop, sampler, generator=gens, cond=batch_cond,
                             progress=progress and terminal, **options)  # fmt: skip
            if stop < 0 and pipe.decoder is not None:
                x = pipe.decoder(x)
            out.append(x.float().cpu())
            if progress and not terminal:
                print(f"stage {k}: sampled {end}/{n} ({sampler}, {time.perf_counter() - started:.1f} s)", flush=True)
        return torch.cat(out)

    def generate(self, n: int = 16, **options) -> Tensor:
        """The last stage's n samples (see `generate_stages` for the options)."""
        return self.generate_stages(n, **options)[-1]

    def __call__(self, n: int = 16, *, output_type: str | None = None, **options):
        """The last stage's samples as PIL images (default), "np" (n, H, W, C) in [0, 1] or "pt"."""
        output_type = output_type or "pil"
        check_output_type(output_type)
        return as_images(self.generate(n, **options), output_type)

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | Path) -> Path:
        """A cascade folder: each stage as a model folder (stage-K/), the manifest with the settings."""
        directory = Path(directory)
        if self.source is not None and directory.resolve() == self.source.resolve():
            raise ValueError(f"{directory} is the folder this cascade was loaded from; save to a new folder")
        for k, stage in enumerate(self.stages):
            stage.save_pretrained(directory / stage_component(k))
        manifest = cascade_manifest(self.stages, self.settings)
        write_manifest(directory, manifest)
        self.manifest = manifest
        return directory

    def __repr__(self) -> str:
        shapes = " -> ".join("x".join(map(str, p.output_shape[-2:])) for p in self.stages)
        return f"CascadePipeline({self.source or 'memory'}: {shapes}, conditioning={self.conditioning})"


def check_stages(stages: Sequence[Pipeline]) -> None:
    """The stages fit together: each super-resolution stage refines the previous stage's output,
    conditional stages share one kind of condition, and a truncated stage noises on the schedule
    of the chain it stops."""
    if stages[0].manifest.get("superres") is not None:
        raise ValueError("the first stage of a cascade must be a base model, not a super-resolution stage")
    kinds = {(p.conditioning, p.manifest.get("num_classes")) for p in stages if p.conditioning}
    if len(kinds) > 1:
        raise ValueError(f"the conditional stages of a cascade must share one condition; got {sorted(kinds, key=str)}")
    for k in range(1, len(stages)):
        previous, pipe = stages[k - 1], stages[k]
        if is_cascade(pipe.manifest) or is_cascade(previous.manifest):
            raise ValueError("a cascade's stages are single models; give the models of a cascade, not the cascade")
        sr = pipe.manifest.get("superres")
        if sr is None:
            raise ValueError(f"stage {k} ({pipe.source}) is not a super-resolution stage (no 'superres' entry)")
        low = (sr["channels"], sr["low_size"], sr["low_size"])
        if tuple(previous.output_shape) != low:
            raise ValueError(
                f"stage {k} refines images of shape {low} but stage {k - 1} draws {tuple(previous.output_shape)}"
            )
        if sr["augmentation"] == "truncated":
            if previous.manifest.get("latent") is not None:
                raise ValueError(f"stage {k} is truncated but stage {k - 1} is a latent model: its chain is not images")
            theirs = Schedule.from_config(previous.manifest["schedule"]).to_config()
            if Schedule.from_config(sr["aug_schedule"]).to_config() != theirs:
                raise ValueError(
                    f"stage {k} is truncated: it was trained on the noise of {sr['aug_schedule']}, but stage {k - 1} "
                    f"samples on {theirs}; a stopped chain is a point of its own schedule"
                )


def cascade_manifest(stages: Sequence[Pipeline], settings: Sequence[dict]) -> dict:
    """The base's manifest (its components under stage-0/) plus every stage and its settings."""
    base = stages[0].manifest
    kept = {k: v for k, v in base.items() if k not in ("format", "version", "components", "cascade")}
    # the base's own components under stage-0/ ("stage-0/." is "stage-0"), so the folder loads as the base too
    components = {name: str(Path(stage_component(0)) / rel) for name, rel in base["components"].items()}
    components.update({stage_component(k): stage_component(k) for k in range(len(stages))})
    entries = [{"component": stage_component(k), "sample": dict(s)} for k, s in enumerate(settings)]
    return new_manifest(**kept, components=components, cascade={"stages": entries})


def assemble_cascade(models: Sequence[str | Path], out: str | Path, stages=None) -> Path:
    """`difflab cascade`: a cascade folder at `out` from trained models (base first), with
    per-stage settings (`stages`, as `CascadePipeline.generate_stages` takes them)."""
    pipes = [Pipeline.from_pretrained(m, device="cpu") for m in models]
    overrides = stage_overrides(stages, len(pipes))
    return CascadePipeline(pipes, overrides).save_pretrained(out)
