"""Typed values from YAML data: a dataclass (and its nested dataclasses, lists, dicts and scalars) built by
one walk over `dataclasses.fields`, the job dacite does.

Not jsonargparse: its errors drop list indices (`nums` instead of `nums[0]`) and span several lines, it takes
"yes" for a bool and it refuses the `nums: 0,2,4` shorthand; a study's errors stay one line naming the key.
Lower bounds live beside the fields (`metadata={"min": ...}`), so one rule serves every spec.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from ...errors import UserError

#: scalar type -> (accepted YAML types, what the error says); bools are never numbers here
_SCALARS: dict[Any, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true/false"), int: ((int, str), "an integer"), float: ((int, float, str), "a number"),
    str: ((str, int, float), "a string"),
}


def at_least(bound: int, default: Any) -> Any:
    """A spec field defaulting to `default` that `build` refuses below `bound`."""
    return dataclasses.field(default=default, metadata={"min": bound})


def unique_names(where: str, names: list[str]) -> list[str]:
    """`names`, or a one-line error naming the repeated ones."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{where}: names must be unique, repeated: {dup}")
    return names


def build(tp: Any, value: Any, where: str) -> Any:
    """A value of type `tp` from YAML data; every error is one line naming the key path `where`."""
    label = where or "config"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return build(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(item):  # one item written without the list
            value = [value]
        if isinstance(value, (str, int)) and item is int:  # "0,2,4" or a single number
            value = [x for x in str(value).split(",") if x.strip()]
        _expect(isinstance(value, list), label, "a list", value)
        return [build(item, v, f"{label}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        _expect(isinstance(value, Mapping), label, "a mapping", value)
        return {build(kt, k, label): build(vt, v, f"{label}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp not in _SCALARS:
        raise TypeError(f"{label}: unsupported config type {tp}")
    accepted, what = _SCALARS[tp]
    _expect(isinstance(value, accepted) and (tp is bool or not isinstance(value, bool)), label, what, value)
    try:
        return tp(value)
    except ValueError:
        raise UserError(f"{label}: expected {what}, got {value!r}") from None


def _build_dataclass(tp: Any, value: Any, where: str) -> Any:
    """Keys given override the field's defaults; a mapping for a field whose default is an instance (the
    study's small calibration) overrides that instance's values, not the class's."""
    label = where or "config"
    _expect(isinstance(value, Mapping), label, "a mapping", value)
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp)}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise UserError(f"{label}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for k, v in value.items():
        path = f"{where}.{k}" if where else k
        f = fields[k]
        if isinstance(v, Mapping) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                v = {**dataclasses.asdict(default), **v}
        kwargs[k] = build(hints[k], v, path)
        low = f.metadata.get("min")
        if low is not None and kwargs[k] < low:
            raise UserError(f"{path} must be >= {low}, got {kwargs[k]}")
    missing = [f.name for f in fields.values() if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{label}: missing required key(s) {missing}")
    return tp(**kwargs)


def _expect(ok: bool, label: str, what: str, value: Any) -> None:
    if not ok:
        got = f"{value!r}" if what in ("true/false", "an integer", "a number", "a string") \
            else f"{type(value).__name__} {value!r}"  # containers: say what came instead
        raise UserError(f"{label}: expected {what}, got {got}")
