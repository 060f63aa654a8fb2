"""Config-built networks that save and load themselves without pickle.

Every network in difflab is a :class:`ConfigModule`: it is fully described by a
frozen dataclass config (plain JSON-able values), so a directory holding
``config.json`` + ``model.safetensors`` is enough to rebuild it bit for bit.
This module also holds the small input checks that every network's
``forward(x, t, cond=None)`` shares, so all networks reject bad input the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from difflab.tensorfiles import load_tensors, tensor_shapes

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Keys of config.json that describe the file rather than the network.
_META_KEYS = ("class", "format_version", "dtype")
# Sanity limits, far beyond any network difflab trains, so that a typo or a crafted config.json
# is refused by name before anything is built (even on the meta device, each block costs time):
MAX_CONFIG_INT = 1 << 16  # any width, size or count in a network config
MAX_REPEATS = 32  # blocks built one after another: these fields, and the length of a list of ints
REPEAT_FIELDS = ("depth", "num_res_blocks", "num_layers")
MAX_PARAMETERS = 1 << 30  # 4 GiB of float32 weights

NETWORKS: dict[str, type[ConfigModule]] = {}
"""Registry of network classes by class name, filled as each class is defined."""


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Base of all network configs: frozen, JSON-round-trippable, validated on creation.

    Lists are stored as tuples so a config loaded from JSON compares equal to the
    one that was saved.
    """

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        self._check_limits()
        self.validate()

    def _check_limits(self) -> None:
        """Refuse ints (and lists of ints) beyond the sanity limits, naming the key."""
        for field in dataclasses.fields(self):
            value, name = getattr(self, field.name), f"{type(self).__name__}.{field.name}"
            if _is_int(value):
                _check_at_most(name, value, MAX_REPEATS if field.name in REPEAT_FIELDS else MAX_CONFIG_INT)
            elif isinstance(value, tuple) and value and all(_is_int(v) for v in value):
                _check_at_most(f"the length of {name}", len(value), MAX_REPEATS)
                _check_at_most(f"{name} entry", max(value), MAX_CONFIG_INT)

    def validate(self) -> None:
        """Raise ValueError for inconsistent settings; subclasses extend this."""

    def to_dict(self) -> dict[str, Any]:
        data = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetConfig:
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__} needs a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} keys {unknown}; allowed keys: {cls.field_names()}"
            )
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_at_most(name: str, value: int, limit: int) -> None:
    if value > limit:
        raise ValueError(f"{name} = {value} is too large: at most {limit} (a limit on network sizes)")


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    """Reject non-integers (bools included) and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_optional_int(name: str, value: Any, minimum: int) -> None:
    if value is not None:
        check_int(name, value, minimum)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_probability(name: str, value: Any, *, allow_one: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    upper_ok = value <= 1 if allow_one else value < 1
    if not (value >= 0 and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def check_int_tuple(name: str, value: Any, minimum: int, *, allow_empty: bool) -> None:
    if not isinstance(value, tuple):
        raise ValueError(f"{name} must be a list of ints, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    for item in value:
        check_int(f"{name} entry", item, minimum)


# --------------------------------------------------------------------------- networks


class ConfigModule(nn.Module):
    """An nn.Module built from a :class:`NetConfig`, with safetensors save/load.

    Subclasses set ``config_class`` and are registered by class name, so
    ``ConfigModule.from_pretrained(dir)`` can rebuild any of them.
    Construct with a config object, a dict, or keyword overrides::

        UNet(UNetConfig(model_channels=32)); UNet({"model_channels": 32}); UNet(model_channels=32)
    """

    config_class: ClassVar[type[NetConfig]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            known = NETWORKS.get(cls.__name__)
            same_origin = known is not None and (known.__module__, known.__qualname__) == (
                cls.__module__, cls.__qualname__
            )
            if known is not None and not same_origin:  # a re-import may replace itself
                raise ValueError(
                    f"a network class named {cls.__name__!r} is already registered "
                    f"from {known.__module__}; network class names must be unique"
                )
            NETWORKS[cls.__name__] = cls

    def __init__(self, config: NetConfig | Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__()
        self.config = self.resolve_config(config, **overrides)

    @classmethod
    def resolve_config(
        cls, config: NetConfig | Mapping[str, Any] | None = None, **overrides: Any
    ) -> NetConfig:
        """Turn (config object | dict | None) + keyword overrides into a validated config."""
        config_class = cls.config_class
        if config is None:
            return config_class.from_dict(overrides)
        if isinstance(config, config_class):
            if overrides:
                return config_class.from_dict({**config.to_dict(), **overrides})
            return config
        if isinstance(config, Mapping):
            return config_class.from_dict({**config, **overrides})
        raise ValueError(
            f"{cls.__name__} config must be a {config_class.__name__} or a dict, "
            f"got {type(config).__name__}"
        )

    # ----------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Both files are first written under temporary names and only then moved into
        place, so a failure never leaves a half-written file or a new config next to
        old weights.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        floats = [v for v in tensors.values() if v.is_floating_point()]
        dtypes = {str(v.dtype).removeprefix("torch.") for v in floats}
        header = {
            "class": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "dtype": dtypes.pop() if len(dtypes) == 1 else None,
            **self.config.to_dict(),
        }
        metadata = {"format": "pt", "class": type(self).__name__}
        _atomic_write_all(
            [
                (directory / WEIGHTS_FILE, lambda path: save_file(tensors, path, metadata)),
                (directory / CONFIG_FILE, lambda path: _write_json(path, header)),
            ]
        )
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu"
    ) -> ConfigModule:
        """Rebuild a network saved with :meth:`save_pretrained`, in eval mode.

        On the base class this dispatches on the saved ``"class"``; on a subclass
        the saved class must be that subclass.
        """
        directory = Path(directory)
        header = read_config(directory)
        name = header["class"]
        if cls is not ConfigModule and name != cls.__name__:
            raise ValueError(
                f"{directory / CONFIG_FILE} describes a {name!r}, not a {cls.__name__!r}; "
                f"use {name}.from_pretrained or difflab.nets.load_network"
            )
        weights_path = directory / WEIGHTS_FILE
        if not weights_path.is_file():
            raise ValueError(f"missing weights file {weights_path}")
        try:  # the network planned on the meta device: a huge one is refused before any allocation
            planned = plan_network(header)
            dtype = None if header.get("dtype") is None else _dtype_by_name(header["dtype"])
        except ValueError as error:
            raise ValueError(f"{directory / CONFIG_FILE}: {error}") from None
        # and the header's shapes against it: weights that do not fit are refused before loading
        check_state_dict(planned, tensor_shapes(weights_path), source=str(weights_path))
        model = network_class_by_name(name)(_strip_meta(header))
        tensors = load_tensors(weights_path)
        if dtype is not None:
            model.to(dtype)
        model.load_state_dict(tensors, strict=True)
        return model.to(device).eval()


def network_class_by_name(name: str) -> type[ConfigModule]:
    """Registered class ``name``; on a miss, import every difflab.nets module and look again."""
    if not isinstance(name, str):
        raise ValueError(f'a network "class" must be a class name such as "UNet", got {name!r}')
    failures = [] if name in NETWORKS else _import_network_modules()
    if name not in NETWORKS:
        note = f" (modules that failed to import: {failures})" if failures else ""
        raise ValueError(
            f"unknown network class {name!r}; known classes: {sorted(NETWORKS)}{note}"
        )
    return NETWORKS[name]


def _import_network_modules() -> list[str]:
    package = importlib.import_module(__package__)
    failures = []
    for module in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"{__package__}.{module.name}")
        except Exception as error:  # report, but let the other modules register
            failures.append(f"{module.name}: {type(error).__name__}: {error}")
    return failures


def build_network(config: Mapping[str, Any]) -> ConfigModule:
    """Build a fresh network from a flat dict ``{"class": "UNet", **config_fields}``.

    This is the same shape as ``config.json`` (``format_version``/``dtype`` are ignored).
    """
    if not isinstance(config, Mapping) or "class" not in config:
        raise ValueError(
            f'build_network needs a dict with a "class" key naming one of {sorted(NETWORKS)}'
        )
    return network_class_by_name(config["class"])(_strip_meta(config))


def plan_network(config: Mapping[str, Any]) -> ConfigModule:
    """The network `build_network(config)` would build, on the meta device: no memory and no
    initialisation, so a config asking for a huge network fails at once. Refused beyond
    MAX_PARAMETERS, naming the size settings that are larger than their defaults."""
    with torch.device("meta"):
        network = build_network(config)
    count = sum(p.numel() for p in network.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"this {type(network).__name__} would have {count:,} parameters ({count * 4 / 2**30:.1f} GiB in "
            f"float32); at most {MAX_PARAMETERS:,} (a limit on network sizes): reduce "
            + (", ".join(f"{k} = {v}" for k, v in _grown_sizes(network.config).items()) or "its widths")
        )
    return network


def _grown_sizes(config: NetConfig) -> dict[str, Any]:
    """The int (and list of int) settings of a config that are larger than their defaults."""
    grown = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        if _is_int(value) and _is_int(default) and value > default:
            grown[field.name] = value
        elif isinstance(value, tuple) and value and all(_is_int(v) for v in value):
            default = tuple(default) if isinstance(default, list | tuple) else ()
            if len(value) > len(default) or max(value) > max(default, default=0):
                grown[field.name] = list(value)
    return grown


def load_network(directory: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Load any saved difflab network; same as ``ConfigModule.from_pretrained``."""
    return ConfigModule.from_pretrained(directory, device=device)


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"missing {path}; expected a directory written by save_pretrained")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(header, dict) or "class" not in header:
        raise ValueError(f'{path} must be a JSON object with a "class" key')
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this difflab reads {FORMAT_VERSION}"
        )
    return header


def check_state_dict(model: nn.Module, tensors: Mapping[str, Any], source: str) -> None:
    """Raise ValueError naming every missing, unexpected or wrongly shaped tensor; `tensors` maps
    names to tensors or to shapes (a safetensors header's, `difflab.tensorfiles.tensor_shapes`)."""
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    shapes = []
    for name in sorted(set(expected) & set(tensors)):
        want, got = tuple(expected[name].shape), tuple(getattr(tensors[name], "shape", tensors[name]))
        if want != got:
            shapes.append(f"tensor {name!r} has shape {got}, expected {want}")
    problems += shapes[:5] + ([f"and {len(shapes) - 5} more of other shapes"] if len(shapes) > 5 else [])
    if problems:
        raise ValueError(f"{source} does not match {type(model).__name__}: " + "; ".join(problems))


def _dtype_by_name(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f'config "dtype" must name a torch float dtype ("float32"), got {name!r}')
    return dtype


def _strip_meta(header: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in header.items() if k not in _META_KEYS}


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def _atomic_write_all(jobs) -> None:
    """For each (final_path, write): ``write(tmp)`` in the same folder; then rename all.

    Renames happen only after every write succeeded; temporary files never outlive a failure.
    """
    temporary = []
    try:
        for final_path, write in jobs:
            prefix = f".{final_path.name}."
            handle, tmp_path = tempfile.mkstemp(dir=final_path.parent, prefix=prefix)
            os.close(handle)
            temporary.append(tmp_path)
            write(tmp_path)
        for (final_path, _), tmp_path in zip(jobs, temporary):
            os.replace(tmp_path, final_path)
    finally:
        for tmp_path in temporary:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)


# --------------------------------------------------------------------------- forward contract


def check_cond(
    cond: Mapping[str, Any] | None, allowed: Iterable[str], network: str, hint: str = ""
) -> dict:
    """Validate the ``cond`` dict of ``forward``; keys whose value is None count as absent."""
    if cond is None:
        return {}
    if not isinstance(cond, Mapping):
        raise ValueError(f"cond must be a dict or None, got {type(cond).__name__}")
    allowed = tuple(allowed)
    present = {k: v for k, v in cond.items() if v is not None}
    unknown = sorted(set(present) - set(allowed))
    if unknown:
        raise ValueError(
            f"{network} got unknown cond keys {unknown}; this network accepts "
            f"{list(allowed)}" + (f" ({hint})" if hint else "")
        )
    return present


def require_cond(cond: Mapping[str, Any], key: str, network: str, why: str) -> Any:
    if key not in cond:
        raise ValueError(f'{network} needs cond["{key}"] ({why})')
    return cond[key]


def check_image(x: Any, channels: int, network: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{network} expects x as a float (B, C, H, W) tensor, got {shape}")
    if x.shape[1] != channels:
        raise ValueError(f"{network} expects {channels} input channels, got {x.shape[1]}")


def prepare_timesteps(t: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """Return t as a float32 (B,) tensor; numbers and 0-dim tensors are broadcast to B."""
    if isinstance(t, bool):
        raise ValueError("t must be a number or tensor of timesteps, got a bool")
    if isinstance(t, int | float):
        return torch.full((batch_size,), float(t), device=device)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"t must be a number or a tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"t must be a real float or integer tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        return t.to(device=device, dtype=torch.float32).expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"t must have shape ({batch_size},) or be a scalar, got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)
