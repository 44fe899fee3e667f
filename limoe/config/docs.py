"""What every config key means: `limoe config show` and docs/CONFIG.md, both read off the dataclasses.

Each key in `limoe.config` is declared with `setting(default, meaning, valid)`. This module walks
the dataclasses and writes them out two ways: a resolved config with each key's meaning beside it
(YAML that `--config` loads again), and the Markdown reference in docs/CONFIG.md, regenerated with
`python -m limoe.config.docs` from the repository root. `undocumented_keys()` names every key
declared without a meaning or, if it holds numbers, without an interval; the tests require none
and that docs/CONFIG.md is current.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import yaml

from limoe.config.codec import to_dict
from limoe.config.keys import Interval
from limoe.config.run import Config

REFERENCE = Path("docs/CONFIG.md")


@dataclass(frozen=True)
class Key:
    """One config key as declared: where it sits, its annotation, meaning, interval and value."""

    path: str  # dotted, e.g. "model.moe.num_experts"; "data.train[].weight" for a field of each source
    annotation: Any
    meaning: str
    valid: Optional[Interval]
    value: Any  # in the config being described (its default, for the reference)
    depth: int  # nesting level, for indentation
    required: bool  # declared without a default


@dataclass(frozen=True)
class Section:
    path: str
    summary: str  # the first line of the dataclass's docstring
    depth: int


def _is_section(declared: dataclasses.Field, annotation: Any) -> bool:
    """Sections are dataclass fields declared without `setting` (e.g. `model.moe`); all else is a key."""
    return dataclasses.is_dataclass(annotation) and "meaning" not in declared.metadata


def _is_record(annotation: Any) -> bool:
    """A dataclass whose own fields are documented keys (`ShardSource`), rather than a plain value
    type whose numbers the enclosing key's interval governs."""
    return dataclasses.is_dataclass(annotation) and any("meaning" in f.metadata for f in dataclasses.fields(annotation))


def _element(annotation: Any) -> Any:
    """The item type of `tuple[X, ...]`, else the annotation itself."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is tuple else annotation


def walk(config: Any, path: str = "", depth: int = 0) -> Iterator[Union[Section, Key]]:
    """Sections and keys of a config dataclass instance in declaration order, nested sections inline."""
    hints = typing.get_type_hints(type(config))
    for declared in dataclasses.fields(config):
        annotation, value = hints[declared.name], getattr(config, declared.name)
        dotted = f"{path}.{declared.name}" if path else declared.name
        if _is_section(declared, annotation):
            yield Section(dotted, _summary(annotation), depth)
            yield from walk(value, dotted, depth + 1)
        else:
            required = declared.default is dataclasses.MISSING and declared.default_factory is dataclasses.MISSING
            yield Key(dotted, annotation, declared.metadata.get("meaning", ""), declared.metadata.get("valid"),
                      value, depth, required)


def walk_all(config: Any) -> Iterator[Union[Section, Key]]:
    """`walk`, with each key that holds records (`data.train`) followed by the record type's own
    keys (`data.train[].weight`, …) at their defaults."""
    for item in walk(config):
        yield item
        if isinstance(item, Key) and _is_record(_element(item.annotation)):
            yield from walk(_defaults(_element(item.annotation)), f"{item.path}[]", item.depth + 1)


def _defaults(cls: type) -> Any:
    """An instance of a record type with placeholders for required fields, for describing it."""
    required = {f.name: "" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    return cls(**required)


def _summary(cls: type) -> str:
    doc = cls.__doc__ or ""
    generated = doc.startswith(f"{cls.__name__}(")  # dataclasses write a signature when there is no docstring
    return "" if generated else " ".join(doc.strip().split("\n\n")[0].split())


def _holds_numbers(annotation: Any) -> bool:
    """Whether the key holds ints or floats its own interval must govern (records govern their own)."""
    if annotation in (int, float):
        return True
    if getattr(annotation, "value_type", None) is not None:  # a mapping type (`PerModality`)
        return _holds_numbers(annotation.value_type)
    if dataclasses.is_dataclass(annotation):
        hints = typing.get_type_hints(annotation)
        return not _is_record(annotation) and any(_holds_numbers(hints[f.name]) for f in dataclasses.fields(annotation))
    return any(_holds_numbers(arg) for arg in typing.get_args(annotation) if typing.get_origin(annotation) is not Literal)


def undocumented_keys(config: Any = None) -> list[str]:
    """Keys and sections that miss a meaning (or, for numbers, an interval), as dotted paths with the reason."""
    problems = []
    for item in walk_all(config or Config()):
        if isinstance(item, Section):
            if not item.summary:
                problems.append(f"{item.path}: its dataclass has no docstring")
            continue
        if not item.meaning:
            problems.append(f"{item.path}: no meaning (declare it with setting(default, meaning, valid))")
        if item.valid is None and _holds_numbers(item.annotation):
            problems.append(f"{item.path}: holds numbers but declares no interval of valid values")
    return problems


# ---------------------------------------------------------------------------------------------
# `limoe config show`: the resolved config as YAML, each key's meaning in a comment


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {name: _plain(item) for name, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def _yaml(value: Any) -> str:
    """A value as inline YAML (`1.0e-05`, `[1, 3]`, `{image: 0.01, text: 0.01}`, `null`)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=float("inf"), allow_unicode=True,
                          sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _comment(key: Key) -> str:
    return key.meaning + (f"; valid: {key.valid}" if key.valid else "")


def describe_config(config: Config) -> str:
    """The config as YAML with a comment on each section and key: its meaning and valid interval.
    A list of records (`data.train`) is written in block style, each record's keys commented too."""
    lines: list[tuple[str, str]] = []  # (YAML text, comment)
    for item in walk(config):
        indent, name = "  " * item.depth, item.path.rsplit(".", 1)[-1]
        if isinstance(item, Section):
            lines.append((f"{indent}{name}:", item.summary))
        elif _is_record(_element(item.annotation)) and item.value:
            lines.append((f"{indent}{name}:", _comment(item)))
            for record in item.value:
                for index, key in enumerate(walk(record, item.path + "[]", item.depth + 1)):
                    bullet = "- " if index == 0 else "  "
                    key_name = key.path.rsplit(".", 1)[-1]
                    lines.append((f"{indent}  {bullet}{key_name}: {_yaml(key.value)}", _comment(key)))
        else:
            lines.append((f"{indent}{name}: {_yaml(item.value)}", _comment(item)))
    column = min(max(len(text) for text, _ in lines), 48)
    return "\n".join(f"{text.ljust(column)}  # {comment}" if comment else text for text, comment in lines) + "\n"


# ---------------------------------------------------------------------------------------------
# docs/CONFIG.md


INTRODUCTION = """\
# Configuration reference

Every key of a training config, with its type, default, valid values and meaning. Training configs
live in `configs/train/` (a recipe may name a `base:` recipe and change some keys); model files in
`configs/models/` hold the `model` section's keys. `--set key=value` overrides any key, with the
value written in YAML (`--set optim.lr=3e-4`, `--set model.moe.layers=[1,3]`). Unknown keys, values
of the wrong type and numbers outside their interval are errors naming the key, so a config that
loads is one the run can use; `limoe config show [--config C] [--set key=value]` prints the
resolved config with these meanings beside the keys.

The defaults below are the dataclasses' own; the shipped model files and recipes set most of the
model, data, optimizer and training keys. Intervals are written as in mathematics: `[1, inf)` is
any number ≥ 1, `(0, 1]` is 0 < x ≤ 1; a float must also be finite.

This page is generated from the dataclasses in `limoe/config/` by `python -m limoe.config.docs`; a
test fails when the two differ or a key has no meaning.
"""


def _type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(f"`{arg}`" for arg in args)
    if origin is tuple:
        return f"list of {_type_text(args[0])}"
    if _is_record(annotation):
        return "{" + ", ".join(f.name for f in dataclasses.fields(annotation)) + "}"
    if dataclasses.is_dataclass(annotation):
        hints = typing.get_type_hints(annotation)
        return "{" + ", ".join(f"{f.name}: {_type_text(hints[f.name])}" for f in dataclasses.fields(annotation)) + "}"
    if getattr(annotation, "value_type", None) is not None:  # a mapping type (`PerModality`)
        return f"{{modality: {_type_text(annotation.value_type)}}}"
    return {str: "string", type(None): "null"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def config_reference() -> str:
    """docs/CONFIG.md: one table per section of every key's type, default, interval and meaning."""
    out = [INTRODUCTION.rstrip("\n")]
    for item in walk_all(Config()):
        if isinstance(item, Section):
            out.append(f"\n## `{item.path}`\n\n{item.summary}\n\n| key | type | default | valid | meaning |\n"
                       "|---|---|---|---|---|")
            continue
        default = "(required)" if item.required else f"`{_yaml(item.value)}`"
        valid = f"`{item.valid}`" if item.valid else ""
        cells = [f"`{item.path}`", _type_text(item.annotation), default, valid, item.meaning]
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    REFERENCE.write_text(config_reference())
    print(f"wrote {REFERENCE}", file=sys.stderr)
