"""Checks of a job request (POST /api/jobs) before it is queued: every field's type and range
against the chosen model, so a bad request is refused with the field's name and what is
allowed, never replaced by a default or found out half-way through sampling."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

from difflab.nets.text import split_words
from difflab.samplers import sampling_plan
from difflab.serve.catalog import GUIDANCE_RANGE, MAX_N, MAX_PROMPT_CHARS, MAX_SEED, Catalog, ModelEntry

MAX_BODY_BYTES = 4096
FIELDS = ("model", "prompt", "label", "sampler", "steps", "guidance", "seed", "n")
PROMPT_PATTERN = re.compile(r"[A-Za-z0-9 .,;:!?'-]*")
PROMPT_ALLOWED = "letters, digits, spaces and . , ; : ! ? ' -"


class RequestError(ValueError):
    """A refused request: `field` (None for the body as a whole) and a message saying what is allowed."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class JobRequest:
    """A checked request, with every default filled in from the model."""

    model: str
    n: int
    steps: int
    sampler: str
    seed: int
    guidance: float | None = None
    label: int | None = None
    prompt: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def generate_options(self) -> dict:
        """`Pipeline.generate`'s keyword arguments."""
        options = {"steps": self.steps, "sampler": self.sampler, "seed": self.seed}
        if self.guidance is not None:
            options["guidance"] = self.guidance
        if self.label is not None:
            options["label"] = self.label
        if self.prompt is not None:
            options["prompt"] = self.prompt
        return options


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object (UTF-8), or a RequestError."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(None, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(None, f"the body must be a JSON object with the keys {', '.join(FIELDS)}")
    return body


def check_job(body: dict, catalog: Catalog) -> JobRequest:
    """A JobRequest from a parsed body; RequestError naming the first bad field."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    name = body.get("model")
    if name not in catalog:
        raise RequestError("model", f"model must be one of {', '.join(catalog.entries)}, got {name!r}")
    entry = catalog[name]
    defaults = entry.describe()["defaults"]
    n = _integer(body, "n", 1, MAX_N, defaults["n"])
    seed = _integer(body, "seed", 0, MAX_SEED, defaults["seed"], "2**63 - 1")
    sampler = body.get("sampler", defaults["sampler"])
    if sampler not in entry.samplers:
        raise RequestError("sampler", f"sampler must be one of {', '.join(entry.samplers)}, got {sampler!r}")
    steps = _integer(body, "steps", 1, entry.max_steps, defaults["steps"])
    try:
        sampling_plan(entry.schedule, sampler, steps)
    except ValueError as e:
        raise RequestError("steps", f"steps={steps} with sampler {sampler!r} does not fit this model: {e}") from None
    return JobRequest(
        model=name, n=n, steps=steps, sampler=sampler, seed=seed, guidance=_guidance(body, entry),
        label=_label(body, entry), prompt=_prompt(body, entry),
    )  # fmt: skip


def _integer(body: dict, key: str, low: int, high: int, default: int, high_text: str | None = None) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(key, f"{key} must be an integer in [{low}, {high_text or high}], got {value!r}")
    return value


def _guidance(body: dict, entry: ModelEntry) -> float | None:
    value = body.get("guidance")
    if value is None:
        return None  # the model's default
    if entry.conditioning is None:
        raise RequestError("guidance", f"model {entry.name!r} is unconditional: leave guidance out, got {value!r}")
    low, high = GUIDANCE_RANGE
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError("guidance", f"guidance must be a number in [{low:g}, {high:g}], got {value!r}")
    if not low <= value <= high:
        raise RequestError("guidance", f"guidance must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _label(body: dict, entry: ModelEntry) -> int | None:
    value = body.get("label")
    if value is None:
        return None  # the classes in turn
    if entry.num_classes is None:
        raise RequestError("label", f"model {entry.name!r} is not class-conditional: leave label out")
    return _integer(body, "label", 0, entry.num_classes - 1, 0)


def _prompt(body: dict, entry: ModelEntry) -> str | None:
    value = body.get("prompt")
    if entry.conditioning != "text":
        if value is not None:
            raise RequestError("prompt", f"model {entry.name!r} is not text-conditional: leave prompt out")
        return None
    if not isinstance(value, str):
        raise RequestError("prompt", f"model {entry.name!r} needs a prompt: a string, got {value!r}")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError("prompt", f"prompt must have at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    if not PROMPT_PATTERN.fullmatch(value):
        bad = sorted(set(PROMPT_PATTERN.sub("", value)))
        raise RequestError("prompt", f"prompt may hold {PROMPT_ALLOWED}; got {''.join(bad)!r}")
    words = len(split_words(value))
    if not 1 <= words <= entry.prompt_words:
        raise RequestError("prompt", f"prompt must have 1 to {entry.prompt_words} words, got {words}")
    return value
