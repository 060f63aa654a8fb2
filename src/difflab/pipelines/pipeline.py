"""`Pipeline`: a model ready to sample in one call, in the spirit of diffusers' pipelines.

    pipe = Pipeline.from_pretrained("digits-ddpm")            # a shipped name, a run or a model folder
    images = pipe(n=16, steps=50, seed=0)                      # 16 PIL images
    pipe = Pipeline.from_pretrained("digits-cfg", device="cuda", dtype="bf16")
    grid = pipe(n=10, label=3, guidance=2, output_type="pt")  # (10, 1, 16, 16) in [-1, 1]

Everything the model folder's manifest says is applied: the x0 thresholding it was trained to
sample with, its default sampler, steps and spacing, its decoder (latent models) and its
conditioning (class labels or prompts, with classifier-free guidance).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difflab.denoiser import Denoiser, device_of, network_dtype
from difflab.devices import parse_dtype, pick_device, warn_if_slow
from difflab.guidance import check_scale, conditioned
from difflab.pipelines.card import write_model_card
from difflab.pipelines.folder import (
    AUTOENCODER,
    CONTROL,
    DENOISER,
    MANIFEST_FILE,
    component_dir,
    output_shape,
    read_manifest,
    resolve,
    write_manifest,
)
from difflab.pipelines.load import LatentDecoder, load_decoder, load_pipeline
from difflab.pipelines.sampling import sample_batched

OUTPUT_TYPES = ("pil", "np", "pt")
PROVENANCE_FILES = ("recipe.toml", "training.json", "metrics.json")  # the card (README.md) is written anew


class Pipeline:
    """A denoiser, its manifest and (latent models) its decoder; call it to draw samples."""

    def __init__(self, denoiser: Denoiser, manifest: dict, decoder: LatentDecoder | None = None, source=None):
        self.denoiser, self.manifest, self.decoder = denoiser, manifest, decoder
        self.source = None if source is None else Path(source)

    @classmethod
    def from_pretrained(
        cls, model: str | Path, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None
    ) -> Pipeline:
        """Load a shipped model by name (`difflab models` lists them), a run folder or a model
        folder; `device` "auto" is CUDA where present; `dtype` float32 (default), bf16 or fp16.
        A cascade folder loads as a `difflab.pipelines.cascade.CascadePipeline`, an unCLIP folder
        as a `difflab.pipelines.unclip.UnCLIPPipeline` (float32)."""
        directory = resolve(model)
        if (directory / MANIFEST_FILE).is_file() and read_manifest(directory).get("cascade") is not None:
            from difflab.pipelines.cascade import CascadePipeline

            return CascadePipeline.from_pretrained(directory, device, dtype)
        from difflab.pipelines.unclip import UnCLIPPipeline, is_unclip

        if is_unclip(directory):
            if dtype is not None and parse_dtype(dtype) not in (None, torch.float32):
                raise ValueError(f"unCLIP models sample in float32; got dtype {dtype!r}")
            return UnCLIPPipeline.from_pretrained(directory, pick_device(device))
        device, dtype = pick_device(device), parse_dtype(dtype)
        denoiser, manifest = load_pipeline(directory, device, dtype)
        return cls(denoiser, manifest, load_decoder(directory, device, dtype), directory)

    # ---------------------------------------------------------------- where it runs
    @property
    def network(self) -> torch.nn.Module:
        return self.denoiser.net

    @property
    def device(self) -> torch.device:
        return device_of(self.denoiser)

    @property
    def dtype(self) -> torch.dtype:
        return network_dtype(self.network)

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Pipeline:
        """Move (and/or cast) every component; returns the pipeline."""
        moves = {}
        if device is not None:
            moves["device"] = pick_device(device)
        if dtype is not None:
            moves["dtype"] = parse_dtype(dtype)
            warn_if_slow(moves.get("device", self.device), moves["dtype"])
        self.network.to(**moves)
        if self.decoder is not None:
            self.decoder.to(**moves)
        return self

    # ---------------------------------------------------------------- sampling
    @property
    def output_shape(self) -> tuple[int, ...]:
        """One sample's shape as returned: the decoded image's for a latent model."""
        return output_shape(self.manifest)

    @property
    def conditioning(self) -> str | None:
        return self.manifest.get("conditioning")

    def settings(
        self, sampler: str | None = None, steps: int | None = None, spacing: str | None = None, eta: float | None = None
    ) -> dict:
        """The sampler settings of a call: what is given, else the model's defaults; an alias
        such as "dpmpp_2m_karras" becomes its sampler and spacing. eta None: the model's eta
        with the model's sampler, the sampler's own default with another (euler_a: 1)."""
        from difflab.samplers import resolve_sampler

        defaults = self.manifest["sample"]
        sampler, spacing = resolve_sampler(
            sampler if sampler is not None else defaults["sampler"],
            spacing if spacing is not None else defaults.get("spacing"),
        )
        if eta is None:  # the model's eta goes with the model's sampler; another sampler keeps its own default
            same = sampler == resolve_sampler(defaults["sampler"], defaults.get("spacing"))[0]
            eta = defaults.get("eta") if same else None
        return {
            "sampler": sampler,
            "steps": steps if steps is not None else defaults["steps"],
            "spacing": spacing,
            "eta": eta,
        }

    def condition(
        self,
        n: int,
        guidance: float | None = None,
        label: int | Sequence[int] | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        control=None,
        control_strength: float | None = None,
        guess_mode: bool | None = None,
    ) -> tuple[Denoiser, dict | None]:
        """The (denoiser, cond) a call samples with: guided and thresholded as the manifest says.
        `guidance` is difflab's w (0 = the plain conditional model); diffusers' guidance_scale is
        w + 1 and may be given instead. A ControlNet takes `control` (a PNG path or a tensor in
        [0, 1], one for all samples or one per sample), `control_strength` and `guess_mode`
        (default: the model's)."""
        if guidance is not None and guidance_scale is not None:
            raise ValueError("give guidance (w) or guidance_scale (w + 1, diffusers' convention), not both")
        if guidance_scale is not None:
            guidance = check_scale(guidance_scale) - 1.0
        if guidance is None:
            guidance = self.manifest["sample"].get("guidance", 0.0) if self.conditioning else 0.0
        if self.manifest.get("superres") is not None:
            raise ValueError(
                "this model is a super-resolution stage: it refines a base model's samples; join them in a cascade "
                "(difflab cascade BASE STAGE --out DIR, then difflab sample DIR)"
            )
        denoiser, cond = conditioned(
            self.denoiser, self.manifest, n, scale=guidance, label=label, prompt=prompt,
            negative_prompt=negative_prompt,
        )  # fmt: skip
        spec = self.manifest.get("control")
        if spec is None:
            if control is not None or control_strength is not None or guess_mode is not None:
                raise ValueError("control, control_strength and guess_mode are for ControlNet models; this is none")
            return denoiser, cond
        if control is None:
            raise ValueError(
                f"this model is a ControlNet: give control=, a {spec['hint']} image (PNG path or tensor in [0, 1]) "
                f"of {spec['channels']} channel(s) and size {spec['size'][0]}x{spec['size'][1]}"
            )
        from difflab.data.controls import load_hint
        from difflab.nets.controlnet import control_condition

        hint = load_hint(control, spec["channels"], spec["size"])
        strength = spec.get("strength", 1.0) if control_strength is None else control_strength
        guess = spec.get("guess_mode", False) if guess_mode is None else guess_mode
        return denoiser, {**(cond or {}), **control_condition(hint, n, strength, guess, self.device)}

    @torch.no_grad()
    def generate(
        self,
        n: int = 16,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        spacing: str | None = None,
        eta: float | None = None,
        guidance: float | None = None,
        guidance_scale: float | None = None,
        label: int | Sequence[int] | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int = 256,
        progress: bool = False,
        callback: Callable[[int, int], None] | None = None,
        control=None,
        control_strength: float | None = None,
        guess_mode: bool | None = None,
    ) -> Tensor:
        """n samples as a float32 CPU tensor: images (n, C, H, W), in [-1, 1] where the model
        clips x0 (decoded for latent models), or the raw vectors of a vector model. Sample i is drawn from its own
        generator seeded by `seed` (so it does not depend on n or the batch size), or from
        `generator` (one, used for all, or a list of n). `callback(done_steps, total_steps)` runs
        after every sampler step; an exception it raises stops sampling. ControlNet models take
        `control`, `control_strength` and `guess_mode` (see `condition`)."""
        denoiser, cond = self.condition(
            n, guidance, label, prompt, negative_prompt, guidance_scale, control, control_strength, guess_mode
        )
        generators = None
        if isinstance(generator, torch.Generator):
            generators = [generator] * n
        elif generator is not None:
            generators = list(generator)
        x = sample_batched(
            denoiser, n, seed=seed, cond=cond, progress=progress, decode=self.decoder, batch_size=batch_size,
            generators=generators, callback=callback, **self.settings(sampler, steps, spacing, eta),
        )  # fmt: skip
        return x

    def __call__(self, n: int = 16, *, output_type: str | None = None, **options):
        """Sample and convert: `output_type` "pil" (a list of PIL images, the default for
        images), "np" (float32 (n, H, W, C) in [0, 1], as diffusers; raw vectors for vector
        models, their default) or "pt" (the float32 tensor in [-1, 1], (n, C, H, W)).
        `options` are `generate`'s: steps, sampler (or an alias such as "dpmpp_2m_karras"),
        spacing, eta, guidance (w) or guidance_scale (w + 1), label, prompt, negative_prompt,
        seed or generator, batch_size, progress, callback; control, control_strength, guess_mode."""
        is_image = len(self.output_shape) == 3
        output_type = output_type or ("pil" if is_image else "np")
        check_output_type(output_type)
        if output_type == "pil" and not is_image:
            raise ValueError("this model draws vectors, not images: use output_type 'np' or 'pt'")
        x = self.generate(n, **options)
        if not is_image:
            return x if output_type == "pt" else x.numpy()
        return as_images(x, output_type)

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a model folder that `from_pretrained` (and `difflab sample`) loads: each
        component's config + safetensors, the manifest, the recipe/training records and a model
        card (README.md, see `difflab.pipelines.card`)."""
        directory = Path(directory)
        if self.source is not None and directory.resolve() == self.source.resolve():
            raise ValueError(f"{directory} is the folder this pipeline was loaded from; save to a new folder")
        network = self.network
        if self.manifest.get("control") is not None:  # a ControlNet: its control branch, then the base as the denoiser
            network.control.save_pretrained(component_dir(directory, self.manifest, CONTROL))
            network = network.base
        network.save_pretrained(component_dir(directory, self.manifest, DENOISER))
        if self.decoder is not None:
            self.decoder.autoencoder.save_pretrained(component_dir(directory, self.manifest, AUTOENCODER))
        write_manifest(directory, self.manifest)
        for name in PROVENANCE_FILES:
            if self.source is not None and (self.source / name).is_file():
                shutil.copyfile(self.source / name, directory / name)
        parameters = sum(p.numel() for p in self.network.parameters())
        write_model_card(directory, self.manifest, parameters=parameters)  # after the records it reports
        return directory

    def __repr__(self) -> str:
        m = self.manifest
        where = f"{self.source}" if self.source is not None else "memory"
        return (
            f"Pipeline({where}: {type(self.network).__name__}, {m['prediction']}-prediction, "
            f"sample_shape={tuple(m['sample_shape'])}, conditioning={m.get('conditioning')}, "
            f"device={self.device}, dtype={self.dtype})"
        )


def check_output_type(output_type: str) -> None:
    """Refuse an unknown output_type before any sampling is done."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")


def as_images(x: Tensor, output_type: str):
    """Images in [-1, 1] as `output_type`: "pt" (clipped), "np" ((n, H, W, C) in [0, 1]) or "pil".
    Clipping: what a decoder or a late sampler step overshoots is not a pixel value."""
    x = x.clamp(-1.0, 1.0)
    if output_type == "pt":
        return x
    if output_type == "np":
        return ((x + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()
    return to_pil(x)


def to_pil(x: Tensor) -> list:
    """(n, C, H, W) in [-1, 1] with C 1 or 3 -> a list of PIL images (L or RGB)."""
    from PIL import Image

    from difflab.data.images import to_uint8_images

    pixels = to_uint8_images(x).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p[:, :, 0] if p.shape[2] == 1 else np.ascontiguousarray(p)) for p in pixels]
