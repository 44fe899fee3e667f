"""Model files: one consolidated `.safetensors` with the resolved config embedded.

The exported file holds every expert (gathered from all expert-parallel ranks) and the config
it was trained with, so evaluation and routing inspection need nothing else. Writes go to a
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
from limoe.errors import LimoeError
from limoe.checkpoints.legacy import modality_registry_name
from limoe.files import atomic_write, save_safetensors
from limoe.model.moe import stacked_expert_state
from limoe.model.prompts import prompt_tuning_metadata, restore_prompt_tuning
from limoe.model.tower import Limoe, build_model

CONFIG_KEY = "limoe_config"
STEP_KEY = "limoe_step"  # the training step the weights were taken at (exports of a training run)


def save_model_file(model: Limoe, config: Config, path: Path, notes: Optional[dict[str, str]] = None,
                    step: Optional[int] = None) -> None:
    """Write all weights (contiguous, on CPU) and the config into one safetensors file; a prompt-tuned
    model's label set goes into the metadata too, and so do `notes` (JSON strings, e.g. a recipe) and
    the training `step` the weights come from (the config only says how many steps were planned)."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {**(notes or {}), CONFIG_KEY: json.dumps(to_dict(config)), **prompt_tuning_metadata(model)}
    if step is not None:
        metadata[STEP_KEY] = str(step)
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, metadata))


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], Config]:
    """The state dict (under today's names: see `legacy`) and config of an exported file; anything
    wrong with it is one LimoeError."""
    config = read_embedded_config(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise LimoeError(f"checkpoint {path} is not a readable safetensors file ({error}).") from None
    return {modality_registry_name(name): tensor for name, tensor in state.items()}, config


def read_embedded_config(path: Path) -> Config:
    """The config embedded in an exported file, read from its header alone (no weights)."""
    return config_from_json(read_model_metadata(path)[CONFIG_KEY], f"checkpoint {path}")


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
    extra or misshapen tensor is a LimoeError naming it and `source`. Files from before the experts
    were stacked name each expert's weights separately; those entries are stacked first."""
    state = stacked_expert_state(state)
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
