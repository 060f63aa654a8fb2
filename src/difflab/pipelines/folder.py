"""Model folders: find them, read and write their manifest, discover the shipped ones.

A model folder is a JSON manifest (``diffusion.json``) plus one sub-folder of config JSON +
safetensors per component; nothing in it is ever unpickled. The manifest says how the
components connect and how to sample:

- ``components``: name -> folder relative to the model folder. ``denoiser`` (the network,
  usually ``"."``) is always there; a latent model adds ``autoencoder``; later methods add
  theirs (a prior, a control branch, cascade stages).
- ``schedule``: `Schedule.to_config()`, so every schedule (named, zero terminal SNR, VE,
  respaced) comes back exactly; ``prediction`` (the parameterisation the denoiser factory is
  keyed by) and its ``denoiser_options`` if any (a consistency model's sigma_data),
  ``variance``, ``sample_shape``.
- ``conditioning``: null, "class" (with ``num_classes``; the null label is num_classes) or
  "text" (with ``null_caption``).
  ``guidance_input``: true for a guidance-distilled network, which takes the guidance weight
  as an input (cond["w"]) instead of being run twice.
- ``thresholding`` / ``thresholding_limit`` (/ ``thresholding_percentile`` of dynamic
  thresholding, default 0.995): what sampling applies to x0_hat;
  ``sample``: the default sampler, steps, spacing, eta and guidance; ``data``: what it was
  trained on; ``latent``: the scale factor and image shape of a latent model.
- ``control`` (a ControlNet, whose components are ``denoiser``, the locked base, and
  ``control``, the control branch): the control image's ``hint`` kind, ``channels`` and ``size``
  [H, W], and the default ``strength`` and ``guess_mode``.
- ``superres`` (a super-resolution stage of a cascade): the ``low_size`` and ``channels`` of its
  low-resolution condition, the ``upsample`` mode, the ``augmentation`` (none, noise, truncated)
  with its ``aug_schedule``, trained ``aug_levels`` and default ``aug_level``.
- ``cascade`` (a cascade, whose top-level fields are its base's): ``stages``, each a component
  (a complete model folder) and its sampling settings; see `difflab.pipelines.cascade`.

Version 1 manifests (written before the pipelines package) are upgraded on read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

MANIFEST_FILE = "diffusion.json"
MANIFEST_FORMAT = "difflab-diffusion"
MANIFEST_VERSION = 2
MODEL_DIR = "model"  # a run folder's exported model
DENOISER = "denoiser"
AUTOENCODER = "autoencoder"
CONTROL = "control"  # a ControlNet's control branch; its "denoiser" is the locked base
CONDITIONINGS = (None, "class", "text")
KEY_ORDER = (
    "format", "version", "components", "schedule", "prediction", "denoiser_options", "variance", "sample_shape",
    "conditioning", "num_classes", "null_caption", "guidance_input", "thresholding", "thresholding_limit",
    "thresholding_percentile", "sample", "data", "latent",
)  # fmt: skip
SAMPLE_DEFAULTS = {"sampler": "ddim", "steps": 50, "spacing": None, "n": 16, "eta": 0.0, "guidance": 0.0}
# sanity limits, so that a crafted manifest is refused before anything is allocated
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_SAMPLE_NUMEL = 1 << 24  # elements of one sample (3 x 2048 x 2048 is 12.6M)


def shipped_root() -> Path:
    from difflab.pretrained import ROOT

    return ROOT


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every model that ships inside the package."""
    root = shipped_root()
    return {p.name: p for p in sorted(root.iterdir()) if (p / MANIFEST_FILE).is_file()}


def resolve(name_or_path: str | Path) -> Path:
    """The model folder meant by a path (a model folder or a run folder holding model/) or the
    name of a shipped model."""
    path = Path(name_or_path)
    if path.exists():
        return find_model_dir(path)
    shipped = shipped_models()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise ValueError(
        f"{str(name_or_path)!r} is neither an existing run/model folder nor a shipped model; "
        f"shipped: {', '.join(shipped) or 'none'}"
    )


def find_model_dir(path: str | Path) -> Path:
    """`path` itself if it holds the manifest, else `path/model` (a run folder), else `path` if
    diffusers wrote it (read through `difflab.interop`)."""
    from difflab.interop.diffusers import is_diffusers_folder

    path = Path(path)
    for candidate in (path, path / MODEL_DIR):
        if (candidate / MANIFEST_FILE).is_file():
            return candidate
    if is_diffusers_folder(path):
        return path
    raise ValueError(
        f"{path} is neither a run folder with {MODEL_DIR}/{MANIFEST_FILE} nor a model folder with "
        f"{MANIFEST_FILE}; was training finished (the model is exported at the end)?"
    )


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a model folder, upgraded to the current version and checked (derived from
    the configs of a diffusers folder)."""
    from difflab.interop.diffusers import is_diffusers_folder, read_diffusers_manifest

    path = Path(directory) / MANIFEST_FILE
    if not path.is_file() and is_diffusers_folder(directory):
        manifest = read_diffusers_manifest(directory)
        check_manifest(manifest, Path(directory))
        return manifest
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"it has {path.stat().st_size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} has format {found!r}, not {MANIFEST_FORMAT!r}")
    if manifest.get("version") == 1:
        manifest = upgrade_v1(manifest)
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')!r}; this difflab reads 1 and {MANIFEST_VERSION}")
    check_manifest(manifest, path)
    return manifest


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Check and write a manifest (atomically: a reader never sees half a file)."""
    path = Path(directory) / MANIFEST_FILE
    check_manifest(manifest, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def new_manifest(**fields) -> dict:
    """A current-version manifest: `fields` over the defaults (one denoiser at ".")."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "components": {DENOISER: "."},
        "conditioning": None,
        "num_classes": None,
        "thresholding": "none",
        "thresholding_limit": 1.0,
        "data": {},
        "latent": None,
        **fields,
    }
    manifest["sample"] = {**SAMPLE_DEFAULTS, **manifest.get("sample", {})}
    first = [k for k in KEY_ORDER if k in manifest]  # a stable order people can read
    return {k: manifest[k] for k in first + [k for k in manifest if k not in KEY_ORDER]}


def upgrade_v1(old: dict) -> dict:
    """A version-1 diffusion.json (schedule by name, T, zero_terminal_snr; the autoencoder's
    folder inside "latent") as a version-2 manifest."""
    from difflab.schedules import Schedule

    schedule = Schedule.make(old["schedule"], old["T"], zero_terminal_snr=old.get("zero_terminal_snr", False))
    components = {DENOISER: "."}
    latent = old.get("latent")
    if latent is not None:
        latent = dict(latent)
        components[AUTOENCODER] = latent.pop("autoencoder")
    conditioning = old.get("conditioning") or ("class" if old.get("num_classes") else None)
    kept = {k: old[k] for k in ("prediction", "variance", "sample_shape", "num_classes", "data", "null_caption")
            if k in old}  # fmt: skip
    return new_manifest(
        **kept,
        components=components,
        schedule=schedule.to_config(),
        conditioning=conditioning,
        thresholding=old.get("thresholding", "none"),
        thresholding_limit=old.get("thresholding_limit", 1.0),
        sample=old.get("sample", {}),
        latent=latent,
    )


def check_manifest(manifest: dict, where: str | Path = MANIFEST_FILE) -> None:
    """Clear errors for a manifest that cannot describe a model (naming the key and file)."""
    from difflab.denoiser import THRESHOLDINGS, parameterizations

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {key} = {manifest.get(key)!r} is not allowed; expected {allowed}")

    for key in ("components", "schedule", "prediction", "variance", "sample_shape", "sample"):
        if key not in manifest:
            raise ValueError(f"{where} lacks the key {key!r}")
    components = manifest["components"]
    need(isinstance(components, dict) and DENOISER in components, "components", f"a dict with {DENOISER!r}")
    need(isinstance(manifest["sample"], dict), "sample", "a dict of sampling defaults")
    for name, rel in components.items():
        parts = Path(str(rel)).parts
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in parts:
            raise ValueError(f"{where}: component {name!r} must be a folder inside the model folder, got {rel!r}")
    schedule = _manifest_schedule(manifest["schedule"], where)
    need(manifest["prediction"] in parameterizations(), "prediction", f"one of {', '.join(parameterizations())}")
    shape_rule = f"a list of positive ints, {MAX_SAMPLE_NUMEL} elements at most"
    need(_is_shape(manifest["sample_shape"]), "sample_shape", shape_rule)
    need(manifest.get("conditioning") in CONDITIONINGS, "conditioning", "null, 'class' or 'text'")
    if manifest.get("conditioning") == "class":
        k = manifest.get("num_classes")
        need(isinstance(k, int) and k >= 1, "num_classes", "an integer >= 1 for a class-conditional model")
    if manifest.get("guidance_input", False):
        need(manifest["guidance_input"] is True and manifest.get("conditioning") is not None, "guidance_input",
             "true or false; true only for a conditional model (its network takes the guidance weight)")  # fmt: skip
    need(manifest.get("thresholding", "none") in THRESHOLDINGS, "thresholding", f"one of {', '.join(THRESHOLDINGS)}")
    percentile = manifest.get("thresholding_percentile", 0.995)
    need(isinstance(percentile, int | float) and not isinstance(percentile, bool) and 0 < percentile <= 1,
         "thresholding_percentile", "a number in (0, 1] (dynamic thresholding's quantile of |x0_hat|)")  # fmt: skip
    need(isinstance(manifest.get("denoiser_options", {}), dict), "denoiser_options", "a dict of keyword options")
    if manifest.get("latent") is not None:
        need(AUTOENCODER in components, "components", f"an {AUTOENCODER!r} entry for a latent model")
        image_shape = manifest["latent"].get("image_shape") if isinstance(manifest["latent"], dict) else None
        need(_is_shape(image_shape), "latent", f"a dict whose image_shape is {shape_rule}")
    if manifest.get("control") is not None:
        need(CONTROL in components, "components", f"a {CONTROL!r} entry for a controlled model")
        spec = manifest["control"]
        size = spec.get("size") if isinstance(spec, dict) else None
        shape = [spec["channels"], *size] if isinstance(size, list) and "channels" in spec else None
        rule = "a dict with the control image's channels and size [H, W]"
        need(_is_shape(shape) and len(shape) == 3, "control", rule)
    if manifest.get("superres") is not None or manifest.get("cascade") is not None:
        from difflab.pipelines.cascade import check_cascade_entries

        check_cascade_entries(manifest, where)
    _check_sample_defaults(manifest["sample"], schedule, where)


def _is_shape(shape) -> bool:
    """A list of positive ints with at most MAX_SAMPLE_NUMEL elements in all."""
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        return False
    return min(shape) >= 1 and math.prod(shape) <= MAX_SAMPLE_NUMEL


def _manifest_schedule(config, where):
    """The schedule a manifest describes (T at most MAX_T: building it is cheap), or a clear error."""
    from difflab.schedules import Schedule

    try:
        return Schedule.from_config(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: schedule is not a valid schedule config: {e}") from None


def _check_sample_defaults(defaults: dict, schedule, where) -> None:
    """The default sampler, steps, spacing and eta must sample with the model's schedule, so
    that a plain `difflab sample` works."""
    from difflab.samplers import sampling_plan

    settings = {**SAMPLE_DEFAULTS, **defaults}
    try:
        sampling_plan(schedule, settings["sampler"], settings["steps"], settings["eta"], settings["spacing"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: the default sampling settings {defaults} do not fit the model: {e}") from None


def output_shape(manifest: dict) -> tuple[int, ...]:
    """One sample's shape as a model returns it: the decoded image's for a latent model."""
    latent = manifest.get("latent")
    return tuple(latent["image_shape"] if latent is not None else manifest["sample_shape"])


def component_dir(directory: str | Path, manifest: dict, name: str) -> Path:
    """The folder of a named component, which must lie inside the model folder (links included)."""
    if name not in manifest["components"]:
        raise ValueError(f"the model in {directory} has no component {name!r}; it has {sorted(manifest['components'])}")
    folder = Path(directory) / manifest["components"][name]
    if folder.exists() and not folder.resolve().is_relative_to(Path(directory).resolve()):
        raise ValueError(f"component {name!r} of {directory} leads outside the model folder (to {folder.resolve()})")
    return folder
