"""The linewatch configuration: `config.yaml` loaded and validated in one place, once, by the shell.

Each layer declares its own settings next to the code that uses them (`calibration.settings` for
model, fit and calibration; `pipeline.settings` for the runtime); `Config` composes them into the
file's eight sections. Unknown keys, wrong types and out-of-range values fail at load time with a message
naming the key, the value and what is allowed. Command-line flags are applied with `with_overrides`,
which validates the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from calibration.settings import OfflineConfig
from edge.settings import SettingsError, record_from_dict, to_dict
from pipeline.settings import RuntimeConfig


class ConfigError(ValueError):
    """Invalid configuration; the message names the file, the key, the value and what is allowed."""


@dataclass(frozen=True)
class Config(RuntimeConfig, OfflineConfig):
    """The whole file: `model`, `fit`, `calibration` (offline) and `pipeline`, `publisher`, `metrics`,
    `store`, `ui` (runtime). Being both, it is passed as either layer's settings as it is."""


def config_from_dict(data: dict[str, Any] | None) -> Config:
    try:
        return record_from_dict(Config, data or {})
    except SettingsError as exc:
        raise ConfigError(str(exc)) from None


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
