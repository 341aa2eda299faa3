"""`--set KEY=VALUE` overrides of frozen config dataclasses (training runs, diagnose
thresholds): dotted keys into nested dataclasses, values parsed as the field's type, unknown
keys answered with the closest known ones."""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import fields, is_dataclass, replace


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``key=value`` strings in order; unknown keys and bad values raise ValueError."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        cfg = _set(cfg, key.strip(), raw.strip())
    return cfg


def _set(obj, dotted: str, raw: str, prefix: str = ""):
    head, _, rest = dotted.partition(".")
    by_name = {f.name: f for f in fields(obj)}
    if head not in by_name:
        raise ValueError(f"unknown config key {prefix + dotted!r}{_close(head, by_name, prefix)}")
    value = getattr(obj, head)
    if rest:
        if value is None and dataclass_type(_resolved_type(obj, head)) is not None:
            raise ValueError(f"config key {prefix + head!r} is not used by this recipe "
                             f"(got {prefix + dotted!r})")
        if not is_dataclass(value):
            raise ValueError(f"config key {prefix + head!r} has no sub-keys (got {prefix + dotted!r})")
        return replace(obj, **{head: _set(value, rest, raw, prefix + head + ".")})
    return replace(obj, **{head: _coerce(raw, _resolved_type(obj, head), prefix + dotted)})


def _close(name: str, known, prefix: str) -> str:
    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    if near:
        return f"; did you mean {', '.join(prefix + n for n in near)}?"
    return f"; known: {', '.join(prefix + n for n in known)}"


def _resolved_type(obj, name: str):
    return typing.get_type_hints(type(obj))[name]


def dataclass_type(tp):
    """The dataclass in a field type (`X`, `X | None`), or None."""
    for t in (typing.get_args(tp) or (tp,)):
        if isinstance(t, type) and is_dataclass(t):
            return t
    return None


def _coerce(raw: str, tp, key: str):
    """Parse ``raw`` as the field's type: bool/int/float/str, Optional, tuples, or JSON."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for t in (a for a in args if a is not type(None)):
            try:
                return _coerce(raw, t, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"bad value for {key}: {raw!r}")
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects true/false, got {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{key} expects an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{key} expects a number, got {raw!r}") from None
    if tp is str:
        return raw
    if tp is type(None):
        if raw.lower() in ("none", "null"):
            return None
        raise ValueError(f"{key} expects none, got {raw!r}")
    typing_literal = getattr(typing, "Literal")
    if origin is typing_literal:
        if raw in args:
            return raw
        raise ValueError(f"{key} expects one of {', '.join(map(str, args))}, got {raw!r}")
    # Containers (tuples of numbers, per-layer groups, mixes): JSON, or comma-separated numbers.
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = [_json_or_str(x) for x in raw.split(",")]  # `a,b` for a tuple of names too
    return to_type(value, tp, key)


def _json_or_str(item: str):
    try:
        return json.loads(item)
    except json.JSONDecodeError:
        return item.strip()


def to_type(value, tp, key):
    """A JSON value as the field type `tp` (tuples, lists, dicts, unions, numbers); ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for t in (a for a in args if a is not type(None)):
            try:
                return to_type(value, t, key)
            except ValueError:
                continue
        raise ValueError(f"bad value for {key}: {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} expects a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(to_type(v, args[0], key) for v in value)
        if args and len(args) != len(value):
            raise ValueError(f"{key} expects {len(args)} values, got {len(value)}")
        return tuple(to_type(v, t, key) for v, t in zip(value, args or [typing.Any] * len(value)))
    if origin is list:
        return [to_type(v, args[0] if args else typing.Any, key) for v in value]
    if origin is dict:
        return {k: to_type(v, args[1] if args else typing.Any, key) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if tp is typing.Any:
        return value
    raise ValueError(f"{key}: cannot read {value!r} as {getattr(tp, '__name__', tp)}")


