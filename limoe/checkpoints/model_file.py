"""Model files: one consolidated `.safetensors` with the resolved config embedded.

The exported file holds every expert (gathered from all expert-parallel ranks) and the config
it was trained with, so evaluation and routing inspection need nothing else, and the format
version it was written in, so that a file of an older one reads as today's (`legacy`). Writes go to a
temporary name first and are renamed into place, so a file on disk is always complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from limoe.config import Config, config_from_dict, to_dict
from limoe.checkpoints.legacy import FORMAT_VERSION, OLDEST_VERSION, current_model_state
from limoe.errors import LimoeError
from limoe.files import atomic_write, save_safetensors
from limoe.model.prompts import prompt_tuning_metadata, restore_prompt_tuning
from limoe.model.tower import Limoe, build_model

CONFIG_KEY = "limoe_config"
STEP_KEY = "limoe_step"  # the training step the weights were taken at (exports of a training run)
VERSION_KEY = "limoe_format_version"  # absent from files of the oldest format


def save_model_file(model: Limoe, config: Config, path: Path, notes: Optional[dict[str, str]] = None,
                    step: Optional[int] = None) -> None:
    """Write all weights (contiguous, on CPU) and the config into one safetensors file; a prompt-tuned
    model's label set goes into the metadata too, and so do `notes` (JSON strings, e.g. a recipe) and
    the training `step` the weights come from (the config only says how many steps were planned)."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {**(notes or {}), CONFIG_KEY: json.dumps(to_dict(config)), VERSION_KEY: str(FORMAT_VERSION),
                **prompt_tuning_metadata(model)}
    if step is not None:
        metadata[STEP_KEY] = str(step)
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, metadata))


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], Config]:
    """The state dict (in today's names and layout, whatever format version the file has) and
    config of an exported file; anything wrong with it is one LimoeError."""
    metadata = read_model_metadata(path)
    config = embedded_config(metadata, path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise LimoeError(f"checkpoint {path} is not a readable safetensors file ({error}).") from None
    return current_model_state(state, format_version(metadata, path)), config


def format_version(metadata: dict[str, str], path: Path) -> int:
    """The format version a model file with `metadata` was written in (the oldest if it has none)."""
    text = metadata.get(VERSION_KEY, str(OLDEST_VERSION))
    if not (text.isdigit() and OLDEST_VERSION <= int(text) <= FORMAT_VERSION):
        raise LimoeError(f"checkpoint {path} has format version {text!r}, not one this limoe reads "
                         f"({OLDEST_VERSION} to {FORMAT_VERSION}); load it with the limoe that wrote it.")
    return int(text)


def read_embedded_config(path: Path) -> Config:
    """The config embedded in an exported file, read from its header alone (no weights)."""
    return embedded_config(read_model_metadata(path), path)


def embedded_config(metadata: dict[str, str], path: Path) -> Config:
    """The config in the metadata `read_model_metadata` read from the file `path`."""
    return config_from_json(metadata[CONFIG_KEY], f"checkpoint {path}")


def read_model_metadata(path: Path) -> dict[str, str]:
    """The JSON metadata of an exported file, from its header alone: its config and, for a
    prompt-tuned model, its label set."""
    if not path.is_file():
        raise LimoeError(f"checkpoint {path} does not exist; give an exported .safetensors file or a training workdir.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise LimoeError(f"checkpoint {path} is not a readable safetensors file ({error}).") from None
    if CONFIG_KEY not in metadata:
        raise LimoeError(f"checkpoint {path} has no embedded limoe config; export it with `limoe export`.")
    return metadata


def config_from_json(text: str | bytes, source: str) -> Config:
    """A resolved config stored as JSON (in a model file or folder); anything wrong with it is one
    LimoeError naming `source`."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LimoeError(f"{source}: the stored config is not valid JSON ({error}).") from None
    return config_from_data(data, source)


def config_from_data(data: object, source: str) -> Config:
    """A resolved config from already parsed JSON; a wrong shape or value is one LimoeError."""
    if not isinstance(data, dict):
        raise LimoeError(f"{source}: the stored config is a {type(data).__name__}, not a mapping of keys.")
    try:
        return config_from_dict(data)
    except LimoeError as error:
        raise LimoeError(f"{source}: the stored config is unusable: {error}") from None


def model_with(state: dict[str, torch.Tensor], config: Config, source: Path,
               metadata: Optional[dict[str, str]] = None) -> Limoe:
    """A model of the config's architecture holding `state` (strict: every weight must match), with
    the prompt-tuning parts that `state` and the file's `metadata` describe, if any; a missing,
    extra or misshapen tensor is a LimoeError naming it and `source`."""
    model = build_model(config)
    restore_prompt_tuning(model, state, metadata or {}, str(source))
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = [name for name in expected.keys() & state.keys() if expected[name].shape != state[name].shape]
    if missing or unexpected or misshapen:
        name = (missing or unexpected or sorted(misshapen))[0]
        problem = ("is missing" if missing else "is not part of the model" if unexpected else
                   f"has shape {list(state[name].shape)}, not {list(expected[name].shape)}")
        count = len(missing) + len(unexpected) + len(misshapen)
        raise LimoeError(f"checkpoint {source} does not fit its config's model: tensor '{name}' {problem}"
                         f"{f' (and {count - 1} more)' if count > 1 else ''}.")
    model.load_state_dict(state)
    return model
