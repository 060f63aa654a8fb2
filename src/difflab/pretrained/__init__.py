"""Small checkpoints made by difflab's own recipes, shipped so sampling works at once.

Each folder holds the weights (config.json + model.safetensors), what rebuilds the
denoiser (diffusion.json) and the recipe that made it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "diffusion.json").is_file())


def resolve(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else the shipped model of that name."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if (ROOT / str(name_or_path)).is_dir():
        return ROOT / str(name_or_path)
    raise ValueError(
        f"{str(name_or_path)!r} is neither an existing run/model folder nor a shipped model; "
        f"shipped: {', '.join(available()) or 'none'}"
    )
