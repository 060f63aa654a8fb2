"""Small checkpoints made by difflab's own recipes, shipped so sampling works at once.

Each folder is a model folder (manifest diffusion.json + config.json/model.safetensors per
component) with the recipe that made it; `difflab.pipelines.shipped_models()` lists them."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
