"""Strict conversion between plain YAML-like mappings and frozen dataclasses.

Decoding is strict on purpose: an unknown key, a value of the wrong type or a number outside its
key's interval (see `limoe.config.keys`) is an error naming the key's dotted path, because a typo
in a config silently falling back to a default can waste a week of GPU time. The codec knows no
config type by name; it reads annotations (`int`, `float`, `str`, `bool`, `dict`, `Optional`,
`Union`, `Literal`, `tuple[X, ...]`, dataclasses) and one convention a dataclass may follow:

- `from_yaml_entry(value) -> list` (a classmethod): the entries one item of a YAML list of that
  type stands for, so that a list may hold shorthands. `ShardSource` reads a string as its shard
  spec, and open_clip's `a::b` as two sources. The entries it returns are decoded as usual.

and one for a mapping type: a `collections.abc.Mapping` class with a `value_type` attribute
(`PerModality`) is written as a YAML mapping from names to values of that type; each value is
checked as `<key>.<name>` and the class is built from the checked dict.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Optional

import yaml

from limoe.config.keys import Interval
from limoe.errors import LimoeError

# YAML 1.1 (PyYAML) reads `1e-3` and `1.0e30` as strings; for float keys they mean the number.
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _list_items(value: Any, item_type: Any) -> list:
    """The items of a YAML list of `item_type` (a scalar is a 1-list), shorthands expanded."""
    items = value if isinstance(value, (list, tuple)) else [value]
    from_yaml_entry = getattr(item_type, "from_yaml_entry", None) if dataclasses.is_dataclass(item_type) else None
    if from_yaml_entry is None:
        return list(items)
    return [entry for item in items for entry in from_yaml_entry(item)]


def _convert(value: Any, tp: Any, path: str, valid: Optional[Interval] = None) -> Any:
    """Check `value` against the annotation `tp` and build dataclasses; errors name `path`.

    `valid` applies to every number `value` holds (each item of a list, each value of a `PerModality`).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], path, valid)
        for option in options:  # the first type that accepts the value
            try:
                return _convert(value, option, path, valid)
            except LimoeError:
                pass
        described = " or ".join(
            f"one of {list(typing.get_args(o))}" if typing.get_origin(o) is Literal else f"{_type_name(o)} in {valid}"
            for o in options
        )
        raise LimoeError(f"config key '{path}' must be {described}, got {value!r}.")
    if origin is Literal:
        if value not in args:
            raise LimoeError(f"config key '{path}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin is tuple:
        return tuple(_convert(item, args[0], f"{path}[{i}]", valid) for i, item in enumerate(_list_items(value, args[0])))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LimoeError(f"config key '{path}' must be a mapping, got {value!r}.")
        return from_dict(tp, value, path, valid)
    if _is_mapping_type(tp):
        if not isinstance(value, collections.abc.Mapping):
            raise LimoeError(f"config key '{path}' must be a mapping, got {value!r}.")
        return tp({str(name): _convert(item, tp.value_type, f"{path}.{name}", valid) for name, item in value.items()})
    value = _scalar(value, tp, path)
    if valid is not None and value not in valid:
        kind = "an integer" if tp is int else "a number"
        raise LimoeError(f"config key '{path}' is {value!r}; it must be {kind} in {valid}.")
    return value


def _is_mapping_type(tp: Any) -> bool:
    """A mapping class the codec builds from a YAML mapping (see the module's docstring)."""
    return isinstance(tp, type) and issubclass(tp, collections.abc.Mapping) and hasattr(tp, "value_type")


def _scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
        return float(value)
    if tp in (int, float, str, bool, dict) and type(value) is tp:
        return value
    raise LimoeError(
        f"config key '{path}' must be of type {_type_name(tp)}, got {value!r} ({type(value).__name__})."
    )


def decode_key(cls: type, name: str, value: Any, path: str, valid: Optional[Interval] = None) -> Any:
    """One key of dataclass `cls`, converted and checked against its own interval (else `valid`)."""
    declared = next(f for f in dataclasses.fields(cls) if f.name == name)
    return _convert(value, typing.get_type_hints(cls)[name], path, declared.metadata.get("valid") or valid)


def from_dict(cls: type, data: dict, path: str = "", valid: Optional[Interval] = None) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, wrong types and numbers out of range."""
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise LimoeError(f"unknown config key '{dotted}'{hint}.")
        kwargs[key] = decode_key(cls, key, value, dotted, valid)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise LimoeError(f"config key '{path or cls.__name__}' is missing '{missing[0]}'; it has no default.")
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """The inverse of `from_dict`: plain YAML-safe types (tuples become lists)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, collections.abc.Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` (a `--set`) → (['a', 'b', 'c'], value parsed as a YAML scalar or list), to be
    decoded like the same value written in a file."""
    if "=" not in text:
        raise LimoeError(f"--set {text!r}: write overrides as key.path=value, e.g. train.steps=100.")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed
