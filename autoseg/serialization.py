"""Dataclass <-> JSON, strict: unknown keys, missing keys, wrong types and wrong versions all raise.

Hand-written rather than taken from a library because the errors must name the file and the exact field
(``plans/default.json: configurations.3d_fullres.patch_size[1]: expected int, got 'abc'``), integers must
be accepted where floats are declared (JSON writes 1.0 as 1 in other tools), and tuples must round-trip.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from autoseg import atomic
from autoseg.errors import SchemaError

T = TypeVar("T")


def to_jsonable(obj: Any) -> Any:
    """Turn dataclasses, tuples and dicts into plain JSON values (field order kept)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_jsonable(cls: type[T], data: Any, where: str = "") -> T:
    """Build ``cls`` from JSON values, checking every field; ``where`` prefixes error messages."""
    return typing.cast(T, _convert(cls, data, where or cls.__name__))


def _type_name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _convert(option, value, where)
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(f"{where}: {_type_name(value)} matches none of {tp}")
    if tp is type(None):
        if value is not None:
            raise SchemaError(f"{where}: expected null, got {_type_name(value)}")
        return None
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{where}: expected true or false, got {_type_name(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{where}: expected an integer, got {_type_name(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{where}: expected a number, got {_type_name(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{where}: expected a string, got {_type_name(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {_type_name(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise SchemaError(f"{where}: expected {len(args)} entries, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {_type_name(value)}")
        key_tp, val_tp = args if args else (str, Any)
        out = {}
        for k, v in value.items():
            key = k
            if key_tp is int:
                try:
                    key = int(k)
                except ValueError:
                    raise SchemaError(f"{where}: key {k!r} is not an integer") from None
            out[key] = _convert(val_tp, v, f"{where}.{k}")
        return out
    raise TypeError(f"{where}: unsupported field type {tp!r}")


def _convert_dataclass(cls: Any, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise SchemaError(f"{where}: expected an object, got {_type_name(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise SchemaError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in value:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if has_default:
                continue
            raise SchemaError(f"{where}: missing field {name!r}")
        kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}")
    expected_version = getattr(cls, "SCHEMA_VERSION", None)
    if expected_version is not None and kwargs.get("schema_version") != expected_version:
        raise SchemaError(
            f"{where}: schema_version {kwargs.get('schema_version')!r} is not the supported version"
            f" {expected_version}; regenerate the file with this version of autoseg"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{where}: {exc}") from None


def save(obj: Any, path: str | Path) -> None:
    """Write a dataclass as indented JSON, atomically."""
    atomic.write_json(path, to_jsonable(obj))


def load(cls: type[T], path: str | Path) -> T:
    """Read ``path`` as ``cls``; every problem names the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: not valid JSON ({exc})") from None
    return from_jsonable(cls, data, where=str(path))
