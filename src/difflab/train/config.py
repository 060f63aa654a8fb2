"""Training recipes: TOML files with one section per concern, checked before anything runs.

A recipe has a top-level ``task`` and the sections ``[data]`` and ``[model]`` (free-form
dicts that their builders validate), ``[diffusion]``, ``[train]`` and ``[sample]`` (fixed
keys with defaults, below). ``load_config(path, ["train.lr=1e-3"])`` applies command-line
overrides; every typo and wrong type fails here with a ValueError, not hours into a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflab.losses import LOSS_TYPES, TIME_KINDS, WEIGHTINGS
from difflab.process import PREDICTION_TYPES, VARIANCE_TYPES
from difflab.schedules import MAX_T, SCHEDULE_NAMES

PRECISIONS = ("fp32", "bf16")
BAD_IMAGE_POLICIES = ("raise", "skip")
PARALLEL_STRATEGIES = ("ddp", "fsdp")
FREE_SECTIONS = ("data", "model")
# keys that may change when a run is resumed: they do not change what is computed
RESUMABLE_CHANGES = (
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.num_workers",
    "train.device",
    "sample.sampler",
    "sample.steps",
    "sample.n",
    "sample.eta",
    "sample.guidance",
    "sample.thresholding",
    "control.strength",
    "control.guess_mode",
    "superres.aug_level",
)
THRESHOLDING_CHOICES = ("auto", "none", "static", "dynamic")
FLOAT32_MAX = 3.4028234663852886e38  # every float of a recipe must be a finite float32: lr = 1e39 overflows
MAX_GRID = 10_000  # sample.n: samples drawn for a sample grid (a sanity limit)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key} = {value!r} is not allowed; expected {allowed}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, value, f"one of {', '.join(choices)}")


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion and its objective (see `difflab.losses.DiffusionLoss`).
    `schedule = "ve"`: NCSN's variance-exploding ladder of T levels from `sigma_min` to
    `sigma_max` (0: the largest distance between two training examples, Song & Ermon 2020's
    technique 1), spaced by `ve_spacing` (geometric, or karras). `schedule = "vp"` / "subvp" are
    the score-SDE paper's VP and sub-VP SDEs; `time = "continuous"` trains on fractional t in
    [0, T - 1] (Song et al. 2021), so the model serves SDE/ODE solvers between the grid points."""

    schedule: str = "linear"
    T: int = 1000
    prediction: str = "eps"
    variance: str = "fixed_small"
    loss_type: str = "simple"
    weighting: str = "none"
    snr_gamma: float = 5.0
    lambda_vlb: float = 1e-3
    importance: bool = False
    zero_terminal_snr: bool = False
    sigma_min: float = 0.01
    sigma_max: float = 0.0
    ve_spacing: str = "geometric"
    time: str = "discrete"

    def validate(self) -> None:
        _choice("diffusion.schedule", self.schedule, (*SCHEDULE_NAMES, "ve"))
        _require(0 < self.sigma_min < math.inf, "diffusion.sigma_min", self.sigma_min, "a finite number > 0")
        _require(self.sigma_max == 0 or self.sigma_min < self.sigma_max < math.inf, "diffusion.sigma_max",
                 self.sigma_max, "0 (from the data) or a finite number > sigma_min")  # fmt: skip
        _choice("diffusion.ve_spacing", self.ve_spacing, ("geometric", "karras"))
        _require(not (self.schedule == "ve" and self.zero_terminal_snr), "diffusion.zero_terminal_snr",
                 self.zero_terminal_snr, "false for a VE schedule (its top level is sigma_max)")  # fmt: skip
        _require(1 <= self.T <= MAX_T, "diffusion.T", self.T, f"an int in [1, {MAX_T}]")
        _choice("diffusion.prediction", self.prediction, PREDICTION_TYPES)
        _choice("diffusion.variance", self.variance, VARIANCE_TYPES)
        _choice("diffusion.loss_type", self.loss_type, LOSS_TYPES)
        _choice("diffusion.time", self.time, TIME_KINDS)
        _require(self.time == "discrete" or (self.loss_type == "simple" and not self.importance), "diffusion.time",
                 self.time, 'a continuous time with loss_type = "simple" and importance = false (the bound is a '
                 "sum over the discrete chain)")  # fmt: skip
        _choice("diffusion.weighting", self.weighting, WEIGHTINGS)
        _require(self.snr_gamma > 0, "diffusion.snr_gamma", self.snr_gamma, "a number > 0")
        _require(self.lambda_vlb >= 0, "diffusion.lambda_vlb", self.lambda_vlb, "a number >= 0")
        if self.loss_type == "hybrid" and self.variance != "learned":
            raise ValueError('diffusion.loss_type = "hybrid" trains the variance; it needs variance = "learned"')


@dataclass
class TrainConfig:
    """The optimisation. `batch_size` is the number of examples per optimizer step, summed over
    processes and accumulation micro-batches, so a recipe means the same on any hardware.
    0 turns off grad_clip, ema_decay, sample_every and checkpoint_every (the last still saves
    at the end and on interruption)."""

    steps: int = 10000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0
    accumulate: int = 1
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    num_workers: int = 0
    on_bad_image: str = "raise"
    device: str = "auto"
    parallel: str = "ddp"  # with several processes: "ddp" replicates the model, "fsdp" shards it

    def validate(self) -> None:
        for key in ("steps", "batch_size", "accumulate", "log_every", "keep_checkpoints"):
            _require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "an int >= 1")
        for key in ("warmup_steps", "seed", "sample_every", "checkpoint_every", "num_workers"):
            _require(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "an int >= 0")
        _require(self.lr > 0 and math.isfinite(self.lr), "train.lr", self.lr, "a finite number > 0")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a number >= 0 (0 = no clipping)")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "a number in [0, 1) (0 = no EMA)")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        _require(
            self.batch_size % self.accumulate == 0,
            "train.batch_size",
            self.batch_size,
            f"a multiple of train.accumulate = {self.accumulate}",
        )
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES)
        _choice("train.parallel", self.parallel, PARALLEL_STRATEGIES)
        _require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device) is not None,
            "train.device",
            self.device,
            '"auto", "cpu", "cuda", "cuda:N" or "mps"',
        )


@dataclass
class SampleConfig:
    """How the sample grids (and `difflab sample` by default) draw images. `guidance` is the
    classifier-free guidance weight w of conditional models (0 = the plain conditional model);
    `thresholding` of x0_hat: "auto" clips images to [-1, 1] (static) and leaves vectors alone."""

    sampler: str = "ddim"
    steps: int = 50
    spacing: str = ""  # "" = the sampler's default spacing
    n: int = 16
    eta: float = 0.0
    guidance: float = 0.0
    thresholding: str = "auto"

    def validate(self) -> None:
        from difflab.samplers import ETA_SAMPLERS, SAMPLER_ALIASES, SAMPLERS, SPACINGS, is_respacing_string

        names = (*SAMPLERS, *SAMPLER_ALIASES)
        _require(self.sampler in names, "sample.sampler", self.sampler, f"one of {', '.join(names)}")
        spacing_ok = self.spacing in ("", *SPACINGS) or is_respacing_string(self.spacing)
        _require(spacing_ok, "sample.spacing", self.spacing, f'"" (the default), {", ".join(SPACINGS)} or "ddimS"')
        _require(self.steps >= 1, "sample.steps", self.steps, "an int >= 1")
        _require(1 <= self.n <= MAX_GRID, "sample.n", self.n, f"an int in [1, {MAX_GRID}]")
        _require(self.eta >= 0, "sample.eta", self.eta, "a number >= 0")
        sampler = SAMPLER_ALIASES.get(self.sampler, (self.sampler,))[0]
        _require(self.eta == 0 or sampler in ETA_SAMPLERS, "sample.eta", self.eta,
                 f'0 with sampler "{self.sampler}" (eta is for {", ".join(ETA_SAMPLERS)})')  # fmt: skip
        _require(math.isfinite(self.guidance), "sample.guidance", self.guidance, "a finite number")
        _require(
            self.thresholding in THRESHOLDING_CHOICES, "sample.thresholding", self.thresholding,
            f"one of {', '.join(THRESHOLDING_CHOICES)} (auto: static for images, none for vectors)",
        )  # fmt: skip


@dataclass
class LatentConfig:
    """Latent diffusion: `autoencoder` is the folder of a trained autoencoder (an autoencoder
    run, its model/, or a latent pipeline); "" trains in pixel space. The data set is encoded
    once (posterior modes, `batch_size` images at a time), scaled to unit variance, and the
    exported pipeline carries a copy of the autoencoder to decode its samples."""

    autoencoder: str = ""
    batch_size: int = 64

    def validate(self) -> None:
        _require(self.batch_size >= 1, "latent.batch_size", self.batch_size, "an int >= 1")


@dataclass
class DistillConfig:
    """Progressive distillation (task = "progressive_distillation"): `teacher` is a model folder,
    run or shipped name (v- or x0-prediction); its first round's teacher takes `teacher_steps`
    DDIM steps (even) and the student learns half as many. With `rounds` > 1, `difflab train`
    runs that many rounds in a row, each one a run folder RUN/round-R whose student is the next
    round's teacher (a fresh optimizer each round), halving the steps every round."""

    teacher: str = ""
    teacher_steps: int = 64
    rounds: int = 1

    def validate(self) -> None:
        _require(self.teacher_steps >= 2 and self.teacher_steps % 2 == 0, "distill.teacher_steps",
                 self.teacher_steps, "an even int >= 2")  # fmt: skip
        _require(self.rounds >= 1, "distill.rounds", self.rounds, "an int >= 1")
        halvings = (self.teacher_steps & -self.teacher_steps).bit_length() - 1  # factors of 2 in teacher_steps
        _require(self.rounds <= halvings, "distill.rounds", self.rounds,
                 f"at most {halvings}: teacher_steps = {self.teacher_steps} can be halved that often")  # fmt: skip


CONSISTENCY_CURRICULA = ("fixed", "ct", "ict")


@dataclass
class ConsistencyConfig:
    """Consistency models (task = "consistency"). With a `teacher` (a model folder, run or
    shipped name): consistency distillation, pairs of adjacent levels joined by one Heun step of
    the teacher, the online network initialised from the teacher's weights. Without: consistency
    training from [model]. `curriculum`: "fixed" (`levels` Karras levels, target EMA `target_ema`),
    "ct" (N(k) and mu(k) of Song et al. 2023, mu0 = target_ema) or "ict" (Song & Dhariwal 2023:
    doubling N(k), no EMA target); `s0`/`s1` 0 take the paper's bounds (ct 2/150, ict 10/1280).
    `curriculum_steps`: the K of those schedules (0 = train.steps; set it when a run may later be
    extended, so that extending it does not change the schedule already followed).
    `sigma_data`: the data's standard deviation used by the boundary scalings. `guidance`:
    [w_min, w_max] distils a conditional teacher under classifier-free guidance with w drawn per
    example from that range; the student takes w as an input (Meng et al. 2023), so one network
    serves every w in it (empty: no guidance)."""

    teacher: str = ""
    levels: int = 18
    curriculum: str = "fixed"
    curriculum_steps: int = 0
    s0: int = 0
    s1: int = 0
    target_ema: float = 0.95
    distance: str = "l2"
    weighting: str = "uniform"
    level_sampling: str = "uniform"
    sigma_data: float = 0.5
    guidance: list[float] = field(default_factory=list)

    def validate(self) -> None:
        from difflab.methods.consistency import DISTANCES, LEVEL_SAMPLINGS
        from difflab.methods.consistency import WEIGHTINGS as CM_WEIGHTINGS

        _require(2 <= self.levels <= MAX_T, "consistency.levels", self.levels, f"an int in [2, {MAX_T}]")
        _choice("consistency.curriculum", self.curriculum, CONSISTENCY_CURRICULA)
        _require(0 <= min(self.s0, self.s1) and max(self.s0, self.s1) <= MAX_T, "consistency.s0/s1",
                 (self.s0, self.s1), f"ints in [0, {MAX_T}]")  # fmt: skip
        _require(self.curriculum_steps >= 0, "consistency.curriculum_steps", self.curriculum_steps, "an int >= 0")
        _require(0.0 <= self.target_ema < 1.0, "consistency.target_ema", self.target_ema, "a number in [0, 1)")
        _choice("consistency.distance", self.distance, DISTANCES)
        _choice("consistency.weighting", self.weighting, CM_WEIGHTINGS)
        _choice("consistency.level_sampling", self.level_sampling, LEVEL_SAMPLINGS)
        _require(0.0 < self.sigma_data < math.inf, "consistency.sigma_data", self.sigma_data, "a finite number > 0")
        g = self.guidance
        _require(not g or (len(g) == 2 and 0.0 <= g[0] <= g[1] <= 100.0), "consistency.guidance", g,
                 "[] or [w_min, w_max] with 0 <= w_min <= w_max <= 100")  # fmt: skip
        _require(not g or bool(self.teacher), "consistency.guidance", g, "[] without a teacher (it guides the teacher)")


@dataclass
class ControlConfig:
    """ControlNet (task = "control"): `base` is the locked model (a model folder, run or shipped
    name whose network is a UNet or a TextConditionalUNet, in pixel space); its schedule,
    parameterisation and conditioning are the controlled model's. `hint`: the control computed
    from each training image (`difflab.data.controls`): "mask" (foreground), "edges" (Sobel) or
    "canny". `caption_dropout`: the share of examples whose caption (or class label) is replaced
    by the null one, so that the control alone must carry the layout (ControlNet drops 50%).
    `hint_widths`: the hint encoder's convolution widths. `strength` and `guess_mode`: how the
    sample grids and the exported model sample by default."""

    base: str = ""
    hint: str = "mask"
    caption_dropout: float = 0.5
    hint_widths: list[int] = field(default_factory=lambda: [16, 32])
    strength: float = 1.0
    guess_mode: bool = False

    def validate(self) -> None:
        from difflab.data.controls import HINT_KINDS

        _choice("control.hint", self.hint, HINT_KINDS)
        _require(0.0 <= self.caption_dropout <= 1.0, "control.caption_dropout", self.caption_dropout,
                 "a number in [0, 1]")  # fmt: skip
        _require(bool(self.hint_widths) and all(1 <= w <= 1024 for w in self.hint_widths), "control.hint_widths",
                 self.hint_widths, "a non-empty list of ints in [1, 1024]")  # fmt: skip
        _require(0.0 <= self.strength < math.inf, "control.strength", self.strength, "a finite number >= 0")


@dataclass
class SuperResConfig:
    """A super-resolution stage of a cascade (task = "super_resolution", Ho et al. 2021): [data]
    is the high resolution; each image is downsampled (area average) to `low_size`, corrupted by
    conditioning augmentation and resized back up (`upsample`: bicubic, bilinear or nearest) to be
    concatenated to x_t. `augmentation`: "none" (the clean low-res image), "noise" (non-truncated:
    q(z_s | z) on the named `aug_schedule` of `aug_T` steps) or "truncated" (the same noising on
    the schedule of the `base` model, whose chain the cascade stops at step s). `aug_levels`:
    [low, high], the range of s in [0, 1] drawn per example (s = 0 clean, 1 = pure noise; s T is
    the schedule's step; "none" ignores it and aug_level). `aug_level`: the level the exported
    stage samples with by default. `blur_sigma`: [low, high] std (low-res pixels) of a Gaussian
    blur applied to a share `blur_prob` of the conditions before the noise ([] = no blur).
    `base`: the model the stage refines (a model folder, run or shipped name; needed for
    "truncated", otherwise only checked against). `text_encoder`: a text-conditional model whose
    text encoder the stage uses, frozen (its weights are copied into the stage's
    [model.text_encoder], which must have the same settings, and [model] must set
    freeze_text_encoder = true)."""

    low_size: int = 0
    augmentation: str = "noise"
    aug_levels: list[float] = field(default_factory=lambda: [0.0, 0.5])
    aug_level: float = 0.0
    aug_schedule: str = "cosine"
    aug_T: int = 1000
    upsample: str = "bicubic"
    blur_sigma: list[float] = field(default_factory=list)
    blur_prob: float = 0.5
    base: str = ""
    text_encoder: str = ""

    def validate(self) -> None:
        from difflab.data.resize import UPSAMPLE_MODES
        from difflab.methods.cascade import AUGMENTATIONS

        _require(self.low_size >= 0, "superres.low_size", self.low_size, "an int >= 1 (the low resolution, pixels)")
        _choice("superres.augmentation", self.augmentation, AUGMENTATIONS)
        levels = self.aug_levels
        _require(len(levels) == 2 and 0.0 <= levels[0] <= levels[1] <= 1.0, "superres.aug_levels", levels,
                 "[low, high] with 0 <= low <= high <= 1")  # fmt: skip
        _require(0.0 <= self.aug_level <= 1.0, "superres.aug_level", self.aug_level, "a level in [0, 1]")
        _choice("superres.aug_schedule", self.aug_schedule, SCHEDULE_NAMES)
        _require(1 <= self.aug_T <= MAX_T, "superres.aug_T", self.aug_T, f"an int in [1, {MAX_T}]")
        _choice("superres.upsample", self.upsample, UPSAMPLE_MODES)
        b = self.blur_sigma
        _require(not b or (len(b) == 2 and 0.0 <= b[0] <= b[1] <= 100.0), "superres.blur_sigma", b,
                 "[] (no blur) or [low, high] with 0 <= low <= high <= 100 (pixels)")  # fmt: skip
        _require(0.0 <= self.blur_prob <= 1.0, "superres.blur_prob", self.blur_prob, "a number in [0, 1]")
        _require(self.augmentation != "truncated" or bool(self.base), "superres.base", self.base,
                 'a model folder, run or shipped name: augmentation = "truncated" noises on its schedule')  # fmt: skip


@dataclass
class UnCLIPConfig:
    """unCLIP's prior and decoder (task = "unclip_prior" / "unclip_decoder"): `clip` is the folder
    of the frozen contrastive encoder (a "contrastive" run or its model/). `caption_dropout`: the
    share of captions replaced by "" (prior: ~10%; decoder: ~50%); `image_dropout`: the decoder's
    share of image embeddings replaced by zeros (~10%), drawn independently of the captions.
    `stats_examples`: training images whose embeddings give the prior's standardisation.
    `draws`: prior samples per caption at sampling, the closest to the text kept."""

    clip: str = ""
    caption_dropout: float = 0.1
    image_dropout: float = 0.1
    stats_examples: int = 2048
    draws: int = 2

    def validate(self) -> None:
        for key in ("caption_dropout", "image_dropout"):
            value = getattr(self, key)
            _require(0.0 <= value <= 1.0, f"unclip.{key}", value, "a number in [0, 1]")
        _require(self.stats_examples >= 2, "unclip.stats_examples", self.stats_examples, "an int >= 2")
        _require(1 <= self.draws <= 64, "unclip.draws", self.draws, "an int in [1, 64]")


SECTIONS: dict[str, type] = {
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "latent": LatentConfig,
    "distill": DistillConfig,
    "consistency": ConsistencyConfig,
    "control": ControlConfig,
    "superres": SuperResConfig,
    "unclip": UnCLIPConfig,
}


@dataclass
class Config:
    """A whole recipe. Build it with `load_config` or `Config.from_dict`, which validate."""

    task: str = "diffusion"
    data: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    superres: SuperResConfig = field(default_factory=SuperResConfig)
    unclip: UnCLIPConfig = field(default_factory=UnCLIPConfig)

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        if not isinstance(raw, dict):
            raise ValueError(f"a config must be a table/dict, got {type(raw).__name__}")
        allowed = ["task", *FREE_SECTIONS, *SECTIONS]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; allowed: {', '.join(allowed)}")
        task = raw.get("task", "diffusion")
        if not isinstance(task, str) or not task:
            raise ValueError(f"task = {task!r} must be a non-empty string such as 'diffusion'")
        free = {}
        for name in FREE_SECTIONS:
            value = raw.get(name, {})
            if not isinstance(value, dict):
                raise ValueError(f"[{name}] must be a table, got {value!r}")
            free[name] = dict(value)
        sections = {name: _build_section(name, kind, raw.get(name, {})) for name, kind in SECTIONS.items()}
        return cls(task=task, **free, **sections)

    def to_dict(self) -> dict:
        """Plain JSON/TOML-able values (a deep copy)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _build_section(name: str, kind: type, values: Any):
    if not isinstance(values, dict):
        raise ValueError(f"[{name}] must be a table, got {values!r}")
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{name}]; allowed keys: {', '.join(hints)}")
    section = kind(**{key: _check_type(f"{name}.{key}", value, hints[key]) for key, value in values.items()})
    section.validate()
    return section


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """Return `value` as `expected` (int -> float is the only conversion) or raise."""
    if expected is float and isinstance(value, int | float) and not isinstance(value, bool):
        _require(abs(value) <= FLOAT32_MAX, key, value, "a finite number that fits float32 (|x| <= 3.4e38)")
        return float(value)
    if expected in (int, bool, str) and type(value) is expected:
        return value
    if typing.get_origin(expected) is list and isinstance(value, list):
        (item,) = typing.get_args(expected)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    name = getattr(expected, "__name__", None) or str(expected)
    raise ValueError(f"{key} = {value!r} has type {type(value).__name__}; expected {name}")


# ---------------------------------------------------------------- reading, overriding, writing
def parse_override(override: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001). The value is a TOML literal if it parses
    as one, else the raw string (so `train.precision=bf16` needs no quotes)."""
    key, sep, text = override.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ValueError(f"override {override!r} must look like section.key=value (or task=value)")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return path, value


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Set each `section.key=value` in a copy of the raw recipe dict (nested keys are allowed in
    the free-form [data] and [model] sections: `model.attention.heads=4`)."""
    raw = json.loads(json.dumps(raw))
    for override in overrides:
        path, value = parse_override(override)
        if len(path) > 2 and path[0] not in FREE_SECTIONS:
            raise ValueError(f"override {override!r}: only [data] and [model] have nested keys")
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {part!r} is not a table")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML recipe (or a run's saved config.json), apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    if path.suffix == ".json":
        raw = json.loads(path.read_text(encoding="utf-8"))
    else:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from err
    return Config.from_dict(apply_overrides(raw, overrides))


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved recipe as TOML that `load_config` reads back to an equal Config."""
    path = Path(path)
    path.write_text(to_toml(config.to_dict()), encoding="utf-8")
    return path


def config_changes(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else k))
            return out
        return {prefix: value}

    a, b = flat(old.to_dict(), ""), flat(new.to_dict(), "")
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    return json.dumps(text).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else repr(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def to_toml(table: dict, prefix: str = "") -> str:
    """A minimal TOML writer: scalars first, then one [table] per nested dict."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
            lines += ["", f"[{name}]", to_toml(value, name).rstrip("\n")]
    return "\n".join(lines).strip("\n") + "\n"
