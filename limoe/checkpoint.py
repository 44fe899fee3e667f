"""Model files: one consolidated `.safetensors` with the resolved config embedded.

The exported file holds every expert (gathered from all expert-parallel ranks) and the config
it was trained with, so evaluation and routing inspection need nothing else. Writes go to a
temporary name first and are renamed into place, so a file on disk is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from limoe.config import Config, config_from_dict, to_dict
from limoe.errors import LimoeError
from limoe.model import Limoe

CONFIG_KEY = "limoe_config"


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` then rename onto `path`: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_model_file(model: Limoe, config: Config, path: Path) -> None:
    """Write all weights (contiguous, on CPU) and the config into one safetensors file."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {CONFIG_KEY: json.dumps(to_dict(config))}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], Config]:
    """The state dict and config of an exported file."""
    if not path.is_file():
        raise LimoeError(f"checkpoint {path} does not exist; give an exported .safetensors file or a training workdir.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise LimoeError(f"checkpoint {path} is not a readable safetensors file ({error}).") from None
    if CONFIG_KEY not in metadata:
        raise LimoeError(f"checkpoint {path} has no embedded limoe config; export it with `limoe export`.")
    return state, config_from_dict(json.loads(metadata[CONFIG_KEY]))


def with_eval_capacity(config: Config, capacity_factor: Optional[str]) -> Config:
    """Apply a `--capacity-factor` choice: None keeps the config's, 'dropless', or a number."""
    if capacity_factor is None:
        return config
    if capacity_factor == "dropless":
        factor = None
    else:
        try:
            factor = float(capacity_factor)
        except ValueError:
            raise LimoeError(f"--capacity-factor {capacity_factor!r}: give a number such as 2.0, or 'dropless'.") from None
    moe = dataclasses.replace(config.model.moe, eval_capacity_factor=factor)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, moe=moe))


def load_model(path: Path, device: str = "cpu", capacity_factor: Optional[str] = None) -> tuple[Limoe, Config]:
    """An evaluation-ready model (eval mode, on `device`) from an exported file or a workdir."""
    path = Path(path)
    if path.is_dir():
        from limoe.train_state import consolidated_state  # the trainer's checkpoint format

        state, config = consolidated_state(path)
    else:
        state, config = read_model_file(path)
    config = with_eval_capacity(config, capacity_factor)
    model = Limoe(config.model)
    model.load_state_dict(state)
    return model.to(device).eval(), config
