"""diffusers folders as difflab models, and difflab models as diffusers folders.

A diffusers folder (what `DDIMPipeline.save_pretrained` writes) is `model_index.json`,
`unet/config.json` + `unet/diffusion_pytorch_model.safetensors` and
`scheduler/scheduler_config.json`. difflab reads one as a model folder whose manifest is
derived from the two configs (`read_diffusers_manifest`) and whose denoiser is the U-Net
converted on load (`load_diffusers_unet`), so `Pipeline.from_pretrained(folder)` and
`difflab sample folder` take it as they are; `import_diffusers` writes it out as a difflab
model folder. `export_diffusers` writes a difflab U-Net model the other way, with the
manifest kept in model_index.json under "_difflab" (diffusers ignores keys starting with "_"),
so that what diffusers has no field for (the null label, the sampling defaults, the data)
comes back on import. Only safetensors weights are read: a pickled .bin is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from difflab.interop.scheduler import from_scheduler_config, to_scheduler_config
from difflab.interop.unet2d import (
    UNET_CLASS,
    UnsupportedOption,
    from_diffusers_config,
    from_diffusers_state,
    to_diffusers_config,
    to_diffusers_state,
)

MODEL_INDEX = "model_index.json"
UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
CONFIG_FILE, SCHEDULER_FILE = "config.json", "scheduler_config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = WEIGHTS_FILE + ".index.json"
STASH = "_difflab"  # our manifest inside model_index.json
PIPELINES = {"DDIMScheduler": "DDIMPipeline", "DDPMScheduler": "DDPMPipeline"}
COMPONENTS = ("unet", "scheduler")
PROVENANCE = ("training.json", "metrics.json", "recipe.toml")
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers these folders are written for
MAX_JSON_BYTES = 16 * 2**20


def is_diffusers_folder(path: str | Path) -> bool:
    """A folder diffusers wrote: model_index.json, or unet/ and scheduler/ configs."""
    path = Path(path)
    return (path / MODEL_INDEX).is_file() or (
        (path / UNET_DIR / CONFIG_FILE).is_file() and (path / SCHEDULER_DIR / SCHEDULER_FILE).is_file()
    )


def is_diffusers_unet(folder: str | Path) -> bool:
    """A unet/ folder diffusers wrote (its config names a `_class_name`, difflab's a `class`)."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = _read_json(path)
    except ValueError:  # missing or unreadable: difflab's own loader says what is wrong with it
        return False
    return "_class_name" in config and "class" not in config


def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"it has more than {MAX_JSON_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- import


def read_diffusers_manifest(folder: str | Path) -> dict:
    """The difflab manifest of a diffusers folder (configs only: no weights are read)."""
    from difflab.pipelines.folder import DENOISER, new_manifest

    folder = Path(folder)
    index = _read_json(folder / MODEL_INDEX) if (folder / MODEL_INDEX).is_file() else {}
    extra = sorted(k for k, v in index.items() if not k.startswith("_") and k not in COMPONENTS
                   and isinstance(v, list) and v[:1] != [None])  # fmt: skip
    if extra:
        raise UnsupportedOption(
            f"{folder / MODEL_INDEX} has component(s) {extra} that difflab cannot import; "
            f"allowed: {', '.join(COMPONENTS)} (a UNet2DModel and a DDPM/DDIM scheduler)"
        )
    for sub, name in ((UNET_DIR, CONFIG_FILE), (SCHEDULER_DIR, SCHEDULER_FILE)):
        if not (folder / sub / name).is_file():
            raise ValueError(f"{folder} is a diffusers folder without {sub}/{name}; difflab needs both")
    unet = _read_json(folder / UNET_DIR / CONFIG_FILE)
    fields, (height, width), class_rows = from_diffusers_config(unet)
    if fields["out_channels"] != fields["in_channels"]:
        raise UnsupportedOption(
            f"UNet2DModel option out_channels = {fields['out_channels']} cannot be mapped; "
            f"allowed: in_channels ({fields['in_channels']}), a prediction of the sample's shape"
        )
    derived = from_scheduler_config(_read_json(folder / SCHEDULER_DIR / SCHEDULER_FILE))
    stash = _stash(index)
    num_classes = None
    if class_rows is not None:  # the rows include difflab's null label only where difflab wrote them
        with_null = stash.get("conditioning") == "class" and stash.get("num_classes") == class_rows - 1
        num_classes = class_rows - 1 if with_null else class_rows
    manifest = new_manifest(
        components={DENOISER: UNET_DIR},
        schedule=_kept_schedule(stash.get("schedule"), derived["schedule"]),
        prediction=derived["prediction"],
        variance=derived["variance"],
        sample_shape=[fields["in_channels"], height, width],
        conditioning=None if num_classes is None else "class",
        num_classes=num_classes,
        thresholding=derived["thresholding"],
        thresholding_limit=derived["thresholding_limit"],
        sample={**derived["sample"], "guidance": 0.0, **_dict(stash.get("sample"))},
        data=_dict(stash.get("data")) or {"source": "diffusers"},
    )
    return manifest


def _stash(index: dict) -> dict:
    stash = index.get(STASH)
    manifest = stash.get("manifest") if isinstance(stash, dict) else None
    return manifest if isinstance(manifest, dict) else {}


def _dict(value) -> dict:
    return dict(value) if isinstance(value, dict) else {}


def _kept_schedule(original, derived: dict) -> dict:
    """The schedule config difflab exported (its kind and name) where it is the one the
    scheduler config describes, else the one derived from the scheduler config."""
    from difflab.schedules import Schedule

    if not isinstance(original, dict):
        return derived
    try:
        same = (Schedule.from_config(original).alpha_bar - Schedule.from_config(derived).alpha_bar).abs().max()
    except (ValueError, TypeError, RuntimeError):
        return derived
    return original if same.item() <= 1e-12 else derived


def load_diffusers_unet(folder: str | Path, manifest: dict, device: str | torch.device = "cpu"):
    """The difflab `UNet` of a diffusers unet/ folder, in eval mode, for the manifest
    `read_diffusers_manifest` made (which says whether a null label must be added)."""
    from difflab.nets.base import check_state_dict, plan_network
    from difflab.nets.unet import UNet, UNetConfig

    folder = Path(folder)
    fields, _, class_rows = from_diffusers_config(_read_json(folder / CONFIG_FILE))
    if fields["out_channels"] == fields["in_channels"]:
        fields["out_channels"] = None
    add_null = False
    if class_rows is not None:
        fields["num_classes"] = manifest["num_classes"]
        add_null = class_rows == manifest["num_classes"]
    plan_network({"class": "UNet", **fields})  # a huge config is refused before anything is allocated
    config = UNetConfig.from_dict(fields)
    state = from_diffusers_state(read_weights(folder), config, add_null_label=add_null)
    net = UNet(config)
    check_state_dict(net, state, source=str(folder))
    net.load_state_dict(state)
    return net.to(device).eval()


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers model folder: one safetensors file or its shards; never a pickle."""
    from difflab.tensorfiles import load_tensors

    if (folder / WEIGHTS_FILE).is_file():
        return load_tensors(folder / WEIGHTS_FILE)
    if (folder / SHARD_INDEX).is_file():
        shards = set(_read_json(folder / SHARD_INDEX).get("weight_map", {}).values())
        tensors = {}
        for shard in sorted(shards):
            if Path(shard).name != shard:
                raise ValueError(f"{folder / SHARD_INDEX} names a shard outside the folder: {shard!r}")
            tensors.update(load_tensors(folder / shard))
        return tensors
    pickled = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.bin"))
    hint = (f"; found {pickled}, a pickle difflab never loads: re-save it with "
            "save_pretrained(..., safe_serialization=True)") if pickled else ""  # fmt: skip
    raise ValueError(f"{folder} has no {WEIGHTS_FILE}{hint}")


def import_diffusers(source: str | Path, out: str | Path) -> Path:
    """Convert a diffusers folder into a difflab model folder (manifest + config + safetensors)."""
    from difflab.pipelines.folder import DENOISER, write_manifest

    source, out = Path(source), Path(out)
    if not is_diffusers_folder(source):
        raise ValueError(f"{source} is not a diffusers folder (no {MODEL_INDEX}, nor unet/ and scheduler/ configs)")
    manifest = read_diffusers_manifest(source)
    net = load_diffusers_unet(source / UNET_DIR, manifest)
    manifest = {**manifest, "components": {DENOISER: "."}}
    net.save_pretrained(out)
    write_manifest(out, manifest)
    for name in PROVENANCE:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    _write_card(out, manifest, "difflab", out, net)
    return out


# --------------------------------------------------------------------------- export


def export_diffusers(model, out: str | Path) -> Path:
    """Write a difflab U-Net model (a shipped name, run or model folder, or a `Pipeline`) as a
    diffusers folder that `DDIMPipeline.from_pretrained` / `DDPMPipeline.from_pretrained` load."""
    from difflab.nets.unet import UNet
    from difflab.pipelines import Pipeline

    pipe = model if isinstance(model, Pipeline) else Pipeline.from_pretrained(model, device="cpu")
    manifest, net = pipe.manifest, pipe.network
    if not isinstance(net, UNet):
        raise UnsupportedOption(f"only a difflab UNet maps to diffusers' {UNET_CLASS}; this model's network is a "
                                f"{type(net).__name__}")  # fmt: skip
    if manifest.get("latent") is not None:
        raise UnsupportedOption("latent models (an autoencoder component) cannot be exported to diffusers yet; "
                                "allowed: pixel-space models")  # fmt: skip
    if manifest.get("conditioning") not in (None, "class"):
        raise UnsupportedOption(f"conditioning {manifest.get('conditioning')!r} cannot be exported; allowed: none, "
                                "class (text models need UNet2DConditionModel, not mapped yet)")  # fmt: skip
    shape = manifest["sample_shape"]
    if len(shape) != 3:
        raise UnsupportedOption(f"sample_shape {shape} cannot be exported; allowed: images [C, H, W]")
    scheduler = "DDPMScheduler" if manifest["sample"]["sampler"] == "ddpm" else "DDIMScheduler"
    scheduler_config = to_scheduler_config(manifest, scheduler)
    unet_config = to_diffusers_config(net.config, (shape[1], shape[2]))
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors = to_diffusers_state(state, net.config)
    out = Path(out)
    (out / UNET_DIR).mkdir(parents=True, exist_ok=True)
    (out / SCHEDULER_DIR).mkdir(parents=True, exist_ok=True)
    version = _diffusers_version()
    save_file(tensors, str(out / UNET_DIR / WEIGHTS_FILE), {"format": "pt"})
    _write_json(out / UNET_DIR / CONFIG_FILE, {**unet_config, "_diffusers_version": version})
    _write_json(out / SCHEDULER_DIR / SCHEDULER_FILE, {**scheduler_config, "_diffusers_version": version})
    _write_json(out / MODEL_INDEX, {
        "_class_name": PIPELINES[scheduler], "_diffusers_version": version,
        "scheduler": ["diffusers", scheduler], "unet": ["diffusers", UNET_CLASS],
        STASH: {"format": "difflab-diffusion", "manifest": manifest},
    })  # fmt: skip
    for name in PROVENANCE:
        if pipe.source is not None and (pipe.source / name).is_file():
            shutil.copyfile(pipe.source / name, out / name)
    _write_card(out, manifest, "diffusers", out, net)
    return out


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers is not needed to write its format
        return DIFFUSERS_VERSION


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_card(out: Path, manifest: dict, fmt: str, source: Path, net) -> None:
    from difflab.pipelines.card import write_model_card

    write_model_card(out, manifest, fmt, source=source, parameters=sum(p.numel() for p in net.parameters()))
