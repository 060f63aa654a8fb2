"""unCLIP model folders and sampling: prompt -> CLIP text embedding -> prior (best of `draws`)
-> image embedding -> decoder; image variations, interpolation and text diffs.

An unCLIP folder is a model folder whose manifest is the decoder's with three components,
each a complete folder: ``decoder`` (the "denoiser"), ``prior`` and ``clip`` (the frozen encoder
both were trained on), plus an "unclip" entry with the prior's sampling settings:

    "unclip": {"role": "unclip", "draws": 2, "prior_guidance": 1.0, "prior_steps": 50, "captions": true}

`assemble_unclip(PRIOR, DECODER, OUT)` (``difflab unclip PRIOR DECODER --out DIR``) writes one
and refuses a prior and a decoder trained on different encoders.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.guidance import as_saved, check_scale
from difflab.methods.unclip import guided_decoder, sample_prior, slerp, text_diff
from difflab.pipelines.folder import DENOISER, component_dir, read_manifest, resolve, write_manifest

CLIP, PRIOR, DECODER = "clip", "prior", "decoder"


def is_unclip(directory: str | Path) -> bool:
    """Whether `directory` (a folder or a shipped name) is an assembled unCLIP model."""
    try:
        manifest = read_manifest(resolve(directory))
    except (ValueError, OSError):
        return False
    return (manifest.get("unclip") or {}).get("role") == "unclip"


def assemble_unclip(prior: str | Path, decoder: str | Path, out: str | Path, prior_guidance: float = 1.0) -> Path:
    """Copy a trained prior and decoder (run or model folders) and their encoder into `out`."""
    from difflab.nets import load_network

    prior_dir, decoder_dir, out = resolve(prior), resolve(decoder), Path(out)
    roles = {}
    for name, folder in (("prior", prior_dir), ("decoder", decoder_dir)):
        roles[name] = read_manifest(folder)
        if (roles[name].get("unclip") or {}).get("role") != name:
            raise ValueError(f"{folder} is not an unCLIP {name} (train task = \"unclip_{name}\")")
    folders = {"prior": prior_dir, "decoder": decoder_dir}
    clips = [load_network(component_dir(folders[n], roles[n], CLIP)) for n in ("prior", "decoder")]
    if not all(torch.equal(a, b) for a, b in zip(clips[0].state_dict().values(), clips[1].state_dict().values(),
                                                  strict=True)):  # fmt: skip
        raise ValueError(f"{prior_dir} and {decoder_dir} were trained on different CLIP encoders")
    if out.exists():
        raise ValueError(f"{out} exists; give a new folder")
    shutil.copytree(prior_dir, out / PRIOR)
    shutil.copytree(decoder_dir, out / DECODER)
    shutil.copytree(component_dir(prior_dir, roles["prior"], CLIP), out / CLIP)
    manifest = dict(roles["decoder"])
    manifest["components"] = {DENOISER: DECODER, PRIOR: PRIOR, CLIP: CLIP}
    p = roles["prior"]
    manifest["unclip"] = {"role": "unclip", "draws": p["unclip"].get("draws", 2), "prior_guidance": prior_guidance,
                          "prior_steps": p["sample"]["steps"], "captions": roles["decoder"]["unclip"]["captions"]}
    write_manifest(out, manifest)
    return out


def load_image(image: str | Path | Tensor, size: int, channels: int) -> Tensor:
    """(1, C, size, size) in [-1, 1] from a PNG path or a (C, H, W) / (1, C, H, W) tensor in [-1, 1]."""
    if isinstance(image, Tensor):
        x = image[None] if image.ndim == 3 else image
    else:
        from PIL import Image

        with Image.open(image) as im:
            im = im.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BICUBIC)
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float()
        x = (x.view(size, size, channels).permute(2, 0, 1)[None] / 127.5) - 1.0
    if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"the image must be {channels}x{size}x{size}, got {tuple(x.shape)}")
    return x.float()


class UnCLIPPipeline:
    """`generate(n, prompt=...)`, `variations(image, n)`, `interpolate(a, b, n)`,
    `text_diff(image, text_a, text_b, n)`: images (n, C, H, W) in [-1, 1]."""

    def __init__(self, clip, prior, decoder, manifest: dict):
        self.clip, self.prior, self.decoder, self.manifest = clip, prior, decoder, manifest

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device = "cpu") -> UnCLIPPipeline:
        from difflab.nets.clip import load_clip
        from difflab.pipelines.load import load_pipeline

        directory = resolve(model)
        manifest = read_manifest(directory)
        if not is_unclip(directory):
            raise ValueError(f"{directory} is not an unCLIP folder (assemble one with difflab unclip PRIOR DECODER)")
        clip = load_clip(component_dir(directory, manifest, CLIP), device=device)
        prior, _ = load_pipeline(component_dir(directory, manifest, PRIOR), device)
        decoder, _ = load_pipeline(component_dir(directory, manifest, DENOISER), device)
        return cls(clip, prior, decoder, manifest)

    @property
    def settings(self) -> dict:
        return self.manifest["unclip"]

    @torch.no_grad()
    def image_embeddings(self, prompts: Sequence[str], *, prior_guidance: float | None = None,
                         prior_steps: int | None = None, seed: int = 0) -> Tensor:  # fmt: skip
        s = self.settings
        scale = s["prior_guidance"] if prior_guidance is None else check_scale(prior_guidance)
        return sample_prior(
            self.prior, self.clip, prompts, guidance=scale, draws=s["draws"], steps=prior_steps or s["prior_steps"],
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    @torch.no_grad()
    def decode(self, image_embed: Tensor, captions: Sequence[str] | None = None, *, guidance: float | None = None,
               steps: int | None = None, sampler: str | None = None, seed: int = 0) -> Tensor:  # fmt: skip
        from difflab.samplers import sample

        defaults = self.manifest["sample"]
        scale = defaults.get("guidance", 0.0) if guidance is None else check_scale(guidance)
        denoiser = as_saved(guided_decoder(self.decoder, scale), self.manifest)
        n = image_embed.shape[0]
        cond = {"image_embed": image_embed}
        if self.settings.get("captions"):
            cond["caption"] = list(captions) if captions is not None else [""] * n
        shape = (n, *self.manifest["sample_shape"])
        x = sample(denoiser, shape, sampler or defaults["sampler"], steps or defaults["steps"],
                   generator=torch.Generator().manual_seed(seed), progress=False, cond=cond,
                   device=image_embed.device)  # fmt: skip
        return x.float().cpu().clamp(-1, 1)

    def generate(self, n: int = 4, *, prompt: str | Sequence[str], seed: int = 0, **options) -> Tensor:
        """Text -> prior -> decoder; `options`: prior_guidance, prior_steps, guidance, steps, sampler."""
        prompts = [prompt] * n if isinstance(prompt, str) else [prompt[i % len(prompt)] for i in range(n)]
        prior_opts = {k: options.pop(k) for k in ("prior_guidance", "prior_steps") if k in options}
        embed = self.image_embeddings(prompts, seed=seed, **prior_opts)
        return self.decode(embed, prompts, seed=seed, **options)

    def encode_image(self, image: str | Path | Tensor) -> Tensor:
        cfg = self.clip.config
        device = self.clip.log_logit_scale.device
        with torch.no_grad():
            return self.clip.encode_image(load_image(image, cfg.image_size, cfg.in_channels).to(device))

    def variations(self, image: str | Path | Tensor, n: int = 4, *, seed: int = 0, **options) -> Tensor:
        """Decode one image's embedding n times (no caption): same content, new pixels."""
        return self.decode(self.encode_image(image).expand(n, -1), seed=seed, **options)

    def interpolate(self, image_a, image_b, n: int = 5, *, seed: int = 0, **options) -> Tensor:
        """Decode n embeddings slerped from image_a's to image_b's (one shared seed)."""
        a, b = self.encode_image(image_a), self.encode_image(image_b)
        embeds = slerp(a.expand(n, -1), b.expand(n, -1), torch.linspace(0, 1, n, device=a.device))
        return self.decode(embeds, seed=seed, **options)

    def text_diff(self, image, text_a: str, text_b: str, n: int = 5, *, max_amount: float = 0.5, seed: int = 0,
                  **options) -> Tensor:  # fmt: skip
        """Decode the image's embedding moved along text_b - text_a by amounts 0 .. max_amount."""
        e = self.encode_image(image)
        with torch.no_grad():
            ta, tb = self.clip.encode_text([text_a]), self.clip.encode_text([text_b])
        amounts = torch.linspace(0, max_amount, n, device=e.device)
        embeds = F.normalize(text_diff(e.expand(n, -1), ta, tb, amounts), dim=-1)
        return self.decode(embeds, [text_b] * n, seed=seed, **options)
