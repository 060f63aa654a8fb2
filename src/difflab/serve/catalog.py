"""The models a server offers: each described from its manifest at start-up (cheap, so a bad
folder is refused before the server listens), loaded on first use and then kept."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from difflab.pipelines.folder import (
    DENOISER,
    MODEL_DIR,
    component_dir,
    output_shape,
    read_manifest,
    resolve,
    shipped_models,
)
from difflab.pipelines.pipeline import Pipeline
from difflab.samplers import SAMPLER_ALIASES, SAMPLERS
from difflab.schedules import Schedule

MAX_N = 64  # samples per job
MAX_STEPS = 1000  # sampler steps per job (also at most the model's T)
GUIDANCE_RANGE = (0.0, 20.0)  # classifier-free guidance weight w
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 200
DEFAULT_N = 16
DEFAULT_PROMPT_WORDS = 32  # when a text encoder does not say how many words it reads


@dataclass
class ModelEntry:
    """One model: where it comes from (a folder, or a Pipeline handed over in Python), its
    manifest and what a request may ask of it."""

    name: str
    source: Path | Pipeline
    manifest: dict
    prompt_words: int | None = None
    schedule: Schedule = field(init=False)

    def __post_init__(self):
        self.schedule = Schedule.from_config(self.manifest["schedule"])
        shape = self.output_shape
        if not ((len(shape) == 3 and shape[0] in (1, 3)) or shape == (2,)):
            raise ValueError(
                f"model {self.name!r} draws samples of shape {shape}; the page shows images (1 or 3 channels) "
                "and 2-D points"
            )

    @property
    def output_shape(self) -> tuple[int, ...]:
        return output_shape(self.manifest)

    @property
    def conditioning(self) -> str | None:
        return self.manifest.get("conditioning")

    @property
    def num_classes(self) -> int | None:
        return self.manifest.get("num_classes") if self.conditioning == "class" else None

    @property
    def max_steps(self) -> int:
        return min(MAX_STEPS, self.schedule.T)

    @property
    def samplers(self) -> list[str]:
        """Sampler names and aliases a request may use; the consistency sampler only for a model
        that samples with it (it assumes a consistency-parameterised denoiser)."""
        default = self.manifest["sample"]["sampler"]
        names = [s for s in SAMPLERS if s != "consistency" or default == "consistency"]
        return names + [a for a, (s, _) in SAMPLER_ALIASES.items() if s in names]

    def describe(self) -> dict:
        """What GET /api/models says about the model: enough for the page to build its form."""
        sample = self.manifest["sample"]
        conditional = self.conditioning is not None
        return {
            "name": self.name,
            "conditioning": self.conditioning,
            "labels": list(range(self.num_classes)) if self.num_classes else None,
            "output_shape": list(self.output_shape),
            "samplers": self.samplers,
            "defaults": {
                "sampler": sample["sampler"],
                "steps": min(sample["steps"], self.max_steps),
                "guidance": sample.get("guidance", 0.0) if conditional else None,
                "n": DEFAULT_N,
                "seed": 0,
            },
            "limits": {
                "n": [1, MAX_N],
                "steps": [1, self.max_steps],
                "guidance": list(GUIDANCE_RANGE) if conditional else None,
                "seed": [0, MAX_SEED],
                "prompt_chars": MAX_PROMPT_CHARS if self.conditioning == "text" else None,
                "prompt_words": self.prompt_words,
            },
        }


class Catalog:
    """name -> ModelEntry; `pipeline(name)` loads a model the first time it is asked for."""

    def __init__(self, entries: list[ModelEntry], device: str | None = "auto", dtype: str | None = None):
        if not entries:
            raise ValueError("no models to serve")
        self.entries = {e.name: e for e in entries}
        self.device, self.dtype = device, dtype
        self._loaded: dict[str, Pipeline] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_sources(cls, sources=(), device: str | None = "auto", dtype: str | None = None) -> Catalog:
        """Shipped names, run folders or model folders (default: every shipped model), or a dict
        name -> any of those or a Pipeline. Folder names become model names (made unique)."""
        if isinstance(sources, dict):
            named = list(sources.items())
        else:
            named = [(_name_of(s), s) for s in (sources or list(shipped_models()))]
        entries, taken = [], set()
        for name, source in named:
            unique, k = name, 2
            while unique in taken:
                unique, k = f"{name}-{k}", k + 1
            taken.add(unique)
            entries.append(_entry(unique, source))
        return cls(entries, device, dtype)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self.entries

    def __getitem__(self, name: str) -> ModelEntry:
        return self.entries[name]

    def describe(self) -> list[dict]:
        return [e.describe() for e in self.entries.values()]

    def pipeline(self, name: str) -> Pipeline:
        """The model's Pipeline, loaded once (on the worker thread, so HTTP requests never wait
        for a load) and kept: a server offers a handful of models, each a few MB."""
        with self._lock:
            if name not in self._loaded:
                source = self.entries[name].source
                if isinstance(source, Pipeline):
                    self._loaded[name] = source
                else:
                    self._loaded[name] = Pipeline.from_pretrained(source, device=self.device, dtype=self.dtype)
            return self._loaded[name]

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)


def _name_of(source) -> str:
    """A shipped name as it is; a folder by its name (a run's exported model/ by the run's)."""
    path = Path(str(source))
    return path.parent.name if path.name == MODEL_DIR and path.parent.name else path.name


def _entry(name: str, source) -> ModelEntry:
    if isinstance(source, Pipeline):
        words = _encoder_words(getattr(source.network, "text_encoder", None)) if source.conditioning == "text" else None
        return ModelEntry(name, source, source.manifest, words)
    directory = resolve(source)
    manifest = read_manifest(directory)
    words = None
    if manifest.get("conditioning") == "text":
        config_file = component_dir(directory, manifest, DENOISER) / "config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {config_file}: {e}") from None
        encoder = config.get("text_encoder") if isinstance(config, dict) else None
        words = encoder.get("max_length") if isinstance(encoder, dict) else None
        words = words if isinstance(words, int) and words >= 1 else DEFAULT_PROMPT_WORDS
    return ModelEntry(name, directory, manifest, words)


def _encoder_words(encoder) -> int:
    words = getattr(getattr(encoder, "config", None), "max_length", None)
    return words if isinstance(words, int) else DEFAULT_PROMPT_WORDS
