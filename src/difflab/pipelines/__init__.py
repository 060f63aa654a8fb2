"""Inference: model folders (manifest + safetensors per component), loading, and `Pipeline`,
the one-call way to sample. Nothing here imports the trainer (`difflab.train`)."""

from difflab.pipelines.folder import (
    MANIFEST_FILE,
    MODEL_DIR,
    find_model_dir,
    new_manifest,
    read_manifest,
    resolve,
    shipped_models,
    write_manifest,
)
from difflab.pipelines.load import LatentDecoder, load_decoder, load_pipeline
from difflab.pipelines.pipeline import Pipeline
from difflab.pipelines.sampling import sample_batched, sample_seeds
from difflab.pipelines.unclip import UnCLIPPipeline, assemble_unclip

__all__ = [
    "MANIFEST_FILE",
    "MODEL_DIR",
    "LatentDecoder",
    "Pipeline",
    "UnCLIPPipeline",
    "assemble_unclip",
    "find_model_dir",
    "load_decoder",
    "load_pipeline",
    "new_manifest",
    "read_manifest",
    "resolve",
    "sample_batched",
    "sample_seeds",
    "shipped_models",
    "write_manifest",
]
