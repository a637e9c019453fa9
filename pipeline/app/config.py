"""The linewatch configuration: `config.yaml` loaded and validated in one place, once, by the shell.

Each layer declares its own settings next to the code that uses them (`calibration.settings` for
model, fit and calibration; `pipeline.settings` for the runtime); `Config` composes them into the
file's six sections. Unknown keys, wrong types and out-of-range values fail at load time with a message
naming the key, the value and what is allowed. Command-line flags are applied with `with_overrides`,
which validates the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from calibration.settings import OfflineConfig
from edge.settings import to_dict
from pipeline.settings import RuntimeConfig


class ConfigError(ValueError):
    """Invalid configuration; the message names the file, the key, the value and what is allowed."""


@dataclass(frozen=True)
class Config(RuntimeConfig, OfflineConfig):
    """The whole file: `model`, `fit`, `calibration` (offline) and `pipeline`, `publisher`, `metrics`
    (runtime). Being both, it is passed as either layer's settings as it is."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp`, returning it converted (lists -> tuples, int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} = {value!r}: expected null")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} = {value!r}: expected a {_type_name(tp)}")
        return tuple(_convert(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        return _build(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")


def _check_field(f: dataclasses.Field, value: Any, key: str, raw: Any) -> None:
    """Choices and range of a converted `value`; messages quote the `raw` value as written."""
    meta = f.metadata
    if value is None:
        return
    if meta.get("nonempty") and value == ():
        raise ConfigError(f"{key} = {raw!r}: expected a non-empty list")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} = {raw!r}: expected one of {', '.join(map(str, choices))}")
    lo, hi, lo_open = meta.get("min"), meta.get("max"), meta.get("min_open")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and value > hi
    if below or above:
        allowed = [f"> {lo}" if lo_open else f">= {lo}"] if lo is not None else []
        allowed += [f"<= {hi}"] if hi is not None else []
        raise ConfigError(f"{key} = {raw!r}: out of range, expected a value {' and '.join(allowed)}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key, expected one of {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _convert(data[name], hints[name], key)
            _check_field(f, value, key, data[name])
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    return _build(Config, data or {}, "")


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config; None gives the defaults. Errors are prefixed with the file name."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted-key overrides (e.g. {"model.name": "padim"}) from the command line; None = not given."""
    data = to_dict(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"command line: {exc}") from None
