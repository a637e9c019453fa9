"""Typed records read from plain data: field helpers, validation, and the way back to plain data.

Each layer declares its settings as frozen dataclasses next to the code that uses them; a field's
metadata states what is allowed (a range or a list of choices). `record_from_dict` builds such a
record from YAML or JSON data and checks every field, so the application shell validates
`config.yaml` and the bundle validates its manifest with one set of rules.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """Data that does not fit its typed record; the message names the key, the value and what was expected."""


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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {' and '.join(dict.fromkeys(_type_name(a) for a in args))}"
    if tp is dict or origin is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp`, returning it converted (lists -> tuples, int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(others) < len(typing.get_args(tp)):
            return None
        if len(others) == 1:  # X | None given something: X's own message says what is wrong
            return _convert(value, others[0], key)
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except SettingsError:
                continue
        raise SettingsError(f"{key} = {value!r}: expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise SettingsError(f"{key} = {value!r}: expected null")
    if tp is Any:
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        if not isinstance(value, list | tuple) or (fixed and len(value) != len(args)):
            raise SettingsError(f"{key} = {value!r}: expected a {_type_name(tp)}")
        types_ = args if fixed else (args[0],) * len(value)
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, types_, strict=True)))
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise SettingsError(f"{key} = {value!r}: expected a mapping")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SettingsError(f"{key} = {value!r}: expected a mapping")
        return record_from_dict(tp, value, key)
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
    raise SettingsError(f"{key} = {value!r}: expected {_type_name(tp)}")


def _check_field(f: dataclasses.Field, value: Any, key: str, raw: Any) -> None:
    """Choices and range of a converted `value`; messages quote the `raw` value as written."""
    meta = f.metadata
    if value is None:
        return
    if meta.get("nonempty") and value == ():
        raise SettingsError(f"{key} = {raw!r}: expected a non-empty list")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise SettingsError(f"{key} = {raw!r}: expected one of {', '.join(map(str, choices))}")
    lo, hi, lo_open = meta.get("min"), meta.get("max"), meta.get("min_open")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and value > hi
    if below or above:
        allowed = [f"> {lo}" if lo_open else f">= {lo}"] if lo is not None else []
        allowed += [f"<= {hi}"] if hi is not None else []
        raise SettingsError(f"{key} = {raw!r}: out of range, expected a value {' and '.join(allowed)}")


def record_from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from plain data (YAML, JSON), checking every field's type, range and choices.

    Lists become tuples and ints floats where the field says so; nested dataclasses are built the same
    way. SettingsError names the dotted key, the value and what was expected.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            raise SettingsError(f"{where}: unknown key, expected one of {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _convert(data[name], hints[name], key)
            _check_field(f, value, key, data[name])
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SettingsError(f"{key}: missing, expected {_type_name(hints[name])}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the record's own consistency check (__post_init__)
        raise SettingsError(f"{prefix or cls.__name__}: {exc}") from None
