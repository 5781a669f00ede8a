"""How a YAML file becomes a validated config dataclass: YAML reading and type checks.

`llmkd.config` declares the sections; this module knows nothing about them. Unknown keys and wrong
types are errors naming the key (`distill.epochs`), never ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from llmkd.artifacts import LlmkdError


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except LlmkdError as e:
                errors.append(e)
        raise errors[0]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise LlmkdError(f"{where}: expected a mapping with string keys, got {type(value).__name__} {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise LlmkdError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp)
        return [_check_type(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise LlmkdError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, raw: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a dict, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise LlmkdError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise LlmkdError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    kwargs = {}
    for key, value in raw.items():
        tp = hints[key]
        sub = f"{where}.{key}" if where != "config" else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, sub)
        else:
            kwargs[key] = _check_type(value, tp, sub)
    return cls(**kwargs)


def read_yaml_mapping(path: str | Path, what: str, missing_hint: str = "") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; a missing file or bad YAML is one error naming it."""
    path = Path(path)
    if not path.is_file():
        raise LlmkdError(f"{path}: {what} file not found{missing_hint}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LlmkdError(f"{path}: invalid YAML{where} ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise LlmkdError(f"{path}: expected a mapping at the top level")
    return raw
