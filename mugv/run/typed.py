"""Frozen dataclasses from nested mappings and back, with errors that name the `--config.` flag.

The run config (mugv/run/config.py) is declared as dataclasses; a config file's ml_collections
dict, a checkpoint's config.json or a test's dict becomes one through `from_mapping`, which
refuses a field the dataclass does not have (naming the nearest one) and a value of the wrong
type, and `to_config_dict` turns a dataclass back into the ConfigDict that `configs/*.py` start
from, so every field exists (and is typed) on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping


class ConfigError(ValueError):
    """A run config written wrongly; the message names the `--config.` flag and what to do."""


def flag(path: str) -> str:
    return f"--config.{path}"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def nearest(name: str, choices) -> str | None:
    found = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_field(path: str, key: str, choices) -> ConfigError:
    """`--config.<path>.<key>: no such field; did you mean …` (or the section's fields)."""
    near = nearest(key, choices)
    where = f"config.{path}" if path else "the config"
    hint = f"did you mean {flag(join(path, near))}?" if near else f"{where} has: {', '.join(sorted(choices))}"
    return ConfigError(f"{flag(join(path, key))}: no such field; {hint}")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _optional(tp) -> tuple[bool, object]:
    """(allows None, the type without None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported field type {tp!r}: one type or None")
        return len(args) < len(typing.get_args(tp)), args[0]
    return False, tp


def _tuples(value):
    """Lists (JSON) as tuples, all the way down."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def coerce(value, tp, path: str):
    """`value` as type `tp` (int, float, bool, str, X | None, tuple[...], a dataclass, object)."""
    allows_none, tp = _optional(tp)
    if value is None:
        if allows_none or tp in (object, typing.Any):
            return None
        raise ConfigError(f"{flag(path)} may not be None")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{flag(path)}={value!r}: expected a section (fields of {tp.__name__})")
        return from_mapping(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{flag(path)}={value!r}: expected a tuple")
        if not args:
            return _tuples(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{flag(path)}={_tuples(value)!r}: expected {len(args)} values")
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp in (object, typing.Any):
        return _tuples(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{path}: unsupported field type {tp!r}")
    raise ConfigError(f"{flag(path)}={value!r}: expected {tp.__name__}")


def from_mapping(cls, values: Mapping, path: str = ""):
    """`cls(**values)` with every value coerced to its field's type; unknown fields refused with
    the nearest one named; the dataclass's own validation errors name the flag."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for key, value in dict(values).items():
        if key not in known:
            raise unknown_field(path, key, known)
        kwargs[key] = coerce(value, hints[key], join(path, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ConfigError(msg if "--config." in msg else f"{flag(path) if path else '--config'}: {msg}") from None


def to_config_dict(obj):
    """The ml_collections ConfigDict of a dataclass instance. A None field becomes a typed
    placeholder (FieldReference), so `--config.a.b=value` can set it from the command line."""
    import ml_collections

    out = ml_collections.ConfigDict()
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_config_dict(value)
        elif value is None:
            _, tp = _optional(hints[f.name])
            tp = typing.get_origin(tp) or tp
            out[f.name] = ml_collections.FieldReference(None, field_type=tp if isinstance(tp, type) else object)
        else:
            out[f.name] = value
    return out
