"""Field helpers for the typed settings of every layer.

Each layer declares its settings as frozen dataclasses next to the code that uses them; a field's
metadata states what is allowed (a range or a list of choices). The application shell reads that
metadata when it loads `config.yaml`, so every layer's settings are validated in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def bounded(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> dict[str, Any]:
    """Field metadata: the value must be >= lo (> lo when `lo_open`) and <= hi; None = unbounded."""
    return {"min": lo, "max": hi, "min_open": lo_open}


def one_of(choices: tuple[str, ...]) -> dict[str, Any]:
    """Field metadata: the value must be one of `choices`."""
    return {"choices": tuple(choices)}


def to_dict(settings: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-serialisable) dict of a settings dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(settings))
