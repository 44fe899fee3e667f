"""Config files: YAML under `configs/`, `base:` inheritance, named models and `--set` overrides.

A training config names its model by reference (`model: limoe-b16`, a file in `configs/models/`)
or as a mapping with `base:` plus the keys it changes, so architectures are written down once; a
recipe may likewise name a `base:` recipe. Overrides change the merged mapping before it is decoded,
so they go through the same strict checks as the file (`limoe.config.codec`).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Optional

import yaml

from limoe.config.codec import decode_key, from_dict, parse_override, to_dict
from limoe.config.model import ModelConfig
from limoe.config.moe import resolve_layer_spec
from limoe.config.run import Config
from limoe.errors import LimoeError
from limoe.files import read_text_file


def _config_dir() -> Path:
    """The shipped configs: `limoe.configs` when installed (a wheel, or an editable install, which
    maps it to the checkout's `configs/`; a regular package, so that this is a plain path), else
    the `configs/` beside the `limoe` package in a checkout that is not installed."""
    try:
        return Path(str(importlib.resources.files("limoe.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs"


CONFIG_DIR = _config_dir()


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(read_text_file(path, "config file"))
    except yaml.YAMLError as error:
        raise LimoeError(f"config file {path} is not valid YAML: {error}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LimoeError(f"config file {path} must hold a mapping of keys at the top level.")
    return data


def find_config(name_or_path: str, kind: str) -> Path:
    """A config file given by path, or by name under `configs/<kind>/` (e.g. `limoe-b16`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise LimoeError(f"config file {path} does not exist; check the path.")
        return path
    candidate = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
    raise LimoeError(f"no {kind} config named '{name_or_path}'; known: {', '.join(known)}, or give a .yaml path.")


def deep_merge(base: dict, update: dict) -> dict:
    """`base` updated by `update`, nested mappings merged key by key (neither is modified)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_base(raw: dict, kind: str, chain: tuple[Path, ...] = ()) -> dict:
    """A mapping with `base: name` is that config file's mapping updated by the other keys;
    `chain` holds the files already on the way, so a file that is its own base is an error."""
    if "base" not in raw:
        return raw
    raw = dict(raw)
    path = find_config(str(raw.pop("base")), kind)
    if path.resolve() in chain:
        names = " → ".join(str(link) for link in (*chain, path.resolve()))
        raise LimoeError(f"config files name each other as base: ({names}); one of them must not have a base: key.")
    base = _with_base(_read_yaml(path), kind, (*chain, path.resolve()))
    return deep_merge(base, raw)


def _resolve_model_mapping(raw: Any) -> dict:
    """A model given by name, or as `{base: name, ...changes}`, becomes a full mapping."""
    if isinstance(raw, str):
        raw = {"base": raw}
    if not isinstance(raw, dict):
        raise LimoeError(f"config key 'model' must be a model name or a mapping, got {raw!r}.")
    return _with_base(raw, "models")


def _apply_override(raw: dict, keys: list[str], value: Any) -> None:
    """Set raw[k1][k2]…; a number picks an entry of a list (`tasks.1.steps=50`)."""
    node = raw
    for i, key in enumerate(keys):
        if isinstance(node, list):
            if not (key.isdigit() and int(key) < len(node)):
                raise LimoeError(f"--set {'.'.join(keys)}: '{'.'.join(keys[:i])}' is a list of {len(node)}; "
                                 f"index it with 0..{len(node) - 1}.")
            key = int(key)
        if i == len(keys) - 1:
            node[key] = value
            return
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            section = ".".join(keys[: i + 1])
            raise LimoeError(f"--set {'.'.join(keys)}: '{section}' is not a section of the config.")
        node = child


def _finish_model_mapping(raw: dict) -> dict:
    """Resolve references and `every N` / `last N` layer specs inside a model mapping."""
    model = _resolve_model_mapping(raw)
    moe = model.get("moe")
    if isinstance(moe, dict) and "layers" in moe:
        depth = decode_key(ModelConfig, "depth", model.get("depth", ModelConfig.depth), "model.depth")
        model["moe"] = {**moe, "layers": resolve_layer_spec(moe["layers"], depth)}
    return model


def load_model_config(name_or_path: str, overrides: list[str] = ()) -> ModelConfig:
    """A model architecture by name (`limoe-h14`) or path, with `key=value` overrides."""
    raw = _resolve_model_mapping(_read_yaml(find_config(name_or_path, "models")))
    for keys, value in map(parse_override, overrides):
        _apply_override(raw, keys[1:] if keys[0] == "model" else keys, value)
    return from_dict(ModelConfig, _finish_model_mapping(raw), "model")


def load_config(name_or_path: Optional[str] = None, overrides: list[str] = (), kind: str = "train") -> Config:
    """A full run config (default `configs/<kind>/demo.yaml`) with `a.b=value` overrides.

    `kind` is where a name is looked up (`train` or `pretrain`); a `base:` always names a
    training recipe, so a pretraining config states only what it changes.
    """
    path = find_config(name_or_path or "demo", kind)
    raw = _with_base(_read_yaml(path), "train", (path.resolve(),))
    if "model" in raw:
        raw["model"] = _resolve_model_mapping(raw["model"])
    for keys, value in map(parse_override, overrides):
        _apply_override(raw, keys, value)
    if "model" in raw:
        raw["model"] = _finish_model_mapping(raw["model"])
    return from_dict(Config, raw)


def config_from_dict(data: dict) -> Config:
    """Rebuild a saved (already resolved) config, e.g. the one stored in a checkpoint."""
    return from_dict(Config, data)


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
