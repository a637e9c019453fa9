"""The linewatch configuration: `config.yaml` loaded and validated in one place, once, by the shell.

Each layer declares its own settings next to the code that uses them (`calibration.settings` for
model, fit and calibration; `pipeline.settings` for the runtime); `Config` composes them into the
file's nine sections. Unknown keys, wrong types and out-of-range values fail at load time with a message
naming the key, the value and what is allowed. Environment variables
`LINEWATCH_<SECTION>__<KEY>` (nested keys joined by `__` too) override the file and are validated the
same way; `LINEWATCH_CONFIG` names the file when no `--config` is given. Command-line flags are applied
last with `with_overrides`, which validates the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from calibration.settings import OfflineConfig
from edge.settings import SettingsError, record_from_dict, to_dict
from pipeline.settings import RuntimeConfig

ENV_PREFIX = "LINEWATCH_"
ENV_CONFIG = "LINEWATCH_CONFIG"
ENV_SEPARATOR = "__"


class ConfigError(ValueError):
    """Invalid configuration; the message names the file, the key, the value and what is allowed."""


@dataclass(frozen=True)
class Config(RuntimeConfig, OfflineConfig):
    """The whole file: `model`, `fit`, `calibration` (offline) and `pipeline`, `publisher`, `metrics`,
    `store`, `ui`, `drift` (runtime). Being both, it is passed as either layer's settings as it is."""


def config_from_dict(data: dict[str, Any] | None) -> Config:
    try:
        return record_from_dict(Config, data or {})
    except SettingsError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config with the environment's overrides applied; no file (neither `path`
    nor LINEWATCH_CONFIG) gives the defaults. Errors name the file or the variable."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_CONFIG):
        path = environ[ENV_CONFIG]
    data = {} if path is None else _read_file(Path(path))
    overrides = environment_overrides(environ)
    for dotted, value in overrides.items():
        _assign(data, dotted, value)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        where = _culprit(str(exc), environ) or path or "environment (LINEWATCH_*)"
        raise ConfigError(f"{where}: {exc}") from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data or {}


def _config_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """Config variables of the environment: LINEWATCH_PIPELINE__DEVICE -> "pipeline.device"."""
    out = {}
    for var in environ:
        if var.startswith(ENV_PREFIX) and ENV_SEPARATOR in var:
            out[var] = var[len(ENV_PREFIX) :].lower().replace(ENV_SEPARATOR, ".")
    return out


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Dotted key -> value of every LINEWATCH_<SECTION>__<KEY> variable; values are read as YAML scalars or
    flow collections (`8080`, `true`, `null`, `[{spec: "camera:0"}]`), as they would be in the file."""
    out = {}
    for var, dotted in sorted(_config_variables(environ).items()):
        try:
            out[dotted] = yaml.safe_load(environ[var])
        except yaml.YAMLError as exc:
            raise ConfigError(f"{var}: not a valid YAML value: {' '.join(str(exc).split())}") from None
    return out


def _culprit(message: str, environ: Mapping[str, str]) -> str | None:
    """The variable that set the key an error message names, if a variable did."""
    key = message.split(":", 1)[0].split(" = ", 1)[0]
    for var, dotted in _config_variables(environ).items():
        if key == dotted or key.startswith((f"{dotted}.", f"{dotted}[")) or dotted.startswith(f"{key}."):
            return var
    return None


def _assign(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted-key overrides (e.g. {"model.name": "padim"}) from the command line; None = not given."""
    data = to_dict(config)
    for dotted, value in overrides.items():
        if value is not None:
            _assign(data, dotted, value)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"command line: {exc}") from None
