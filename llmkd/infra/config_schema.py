"""How a YAML file becomes a validated config dataclass: strict YAML, type checks, declared ranges.

`llmkd.infra.config` declares the sections; this module knows nothing about them. Unknown keys, repeated
keys, wrong types and values outside a field's declared range are errors naming the key
(`distill.epochs`), never ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.paths import readable_file


class DuplicateKeyError(yaml.YAMLError):
    """A key repeated in one YAML mapping (PyYAML itself keeps the last value without a word)."""


def check_unique_keys(node: yaml.Node, where: str = "") -> None:
    """Refuse a key that appears twice in any mapping under `node`, naming its path and both lines."""
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name = f"{where}.{key.value}" if where else str(key.value)
            if isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                if key.value in first:
                    raise DuplicateKeyError(f"duplicate key '{name}' at line {line} (first at line {first[key.value]})")
                first[key.value] = line
            check_unique_keys(value, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            check_unique_keys(item, f"{where}[{i}]")


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses repeated keys, in a section or of whole sections."""

    def construct_document(self, node: yaml.Node) -> Any:
        check_unique_keys(node)
        return super().construct_document(node)


def strict_load(text: str) -> Any:
    """`yaml.safe_load`, but a repeated key raises `DuplicateKeyError`."""
    return yaml.load(text, Loader=StrictLoader)


@dataclass(frozen=True)
class Bounds:
    """The range a numeric config field must lie in; NaN lies in none."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x: float) -> bool:
        return not math.isnan(x) and all((
            self.ge is None or x >= self.ge, self.gt is None or x > self.gt,
            self.le is None or x <= self.le, self.lt is None or x < self.lt))

    def __str__(self) -> str:
        parts = [f"{op} {v}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)


def bounded(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field whose value (each element, for a list) must lie in the given range; the
    section's `__post_init__` calls `check_bounds`, so a config built in code is checked too."""
    return field(default=default, default_factory=default_factory, metadata={"bounds": Bounds(ge, gt, le, lt)})


def check_bounds(section: Any, name: str) -> None:
    """Every `bounded` field of the dataclass `section` (called `name` in messages) is in its range."""
    for f in dataclasses.fields(section):
        bounds = f.metadata.get("bounds")
        if bounds is None:
            continue
        value = getattr(section, f.name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            if v is not None and v not in bounds:  # None: an optional field left to its automatic value
                where = f"{name}.{f.name}" + (f"[{i}]" if i is not None else "")
                raise LlmkdError(f"{where}: expected {bounds}, got {v!r}")


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
    path = readable_file(path, f"{what} file", missing_hint)
    try:
        raw = strict_load(path.read_text(encoding="utf-8")) or {}
    except DuplicateKeyError as e:
        raise LlmkdError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LlmkdError(f"{path}: invalid YAML{where} ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise LlmkdError(f"{path}: expected a mapping at the top level")
    return raw
