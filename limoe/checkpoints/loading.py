"""Loading a model for evaluation from whatever a user points at: an exported file, a training
workdir (its newest complete checkpoint) or one of its checkpoint directories, a model folder in
Hugging Face layout, or `hf-hub:org/name`. Nothing is unpickled."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

from limoe.checkpoints import hub
from limoe.checkpoints.model_file import model_with, read_embedded_config, read_model_file, read_model_metadata
from limoe.checkpoints.training import checkpoint_at, checkpoint_config, consolidated_state
from limoe.config import Config
from limoe.errors import LimoeError
from limoe.model.tower import Limoe


def parse_capacity_factor(text: str, option: str = "--capacity-factor") -> Optional[float]:
    """'dropless' → None (capacity = group size); otherwise a positive, finite number."""
    if text == "dropless":
        return None
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise LimoeError(f"{option} {text!r}: give a positive number such as 2.0, or 'dropless'.")
    return factor


def with_eval_capacity(config: Config, capacity_factor: Optional[str]) -> Config:
    """Apply a `--capacity-factor` choice: None keeps the config's, 'dropless', or a number."""
    if capacity_factor is None:
        return config
    moe = dataclasses.replace(config.model.moe, eval_capacity_factor=parse_capacity_factor(capacity_factor))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, moe=moe))


def load_model(checkpoint: str | Path, device: str = "cpu", capacity_factor: Optional[str] = None,
               cache_dir: Optional[str] = None) -> tuple[Limoe, Config]:
    """An evaluation-ready model (eval mode, on `device`) from any checkpoint reference;
    `cache_dir` is huggingface_hub's cache for `hf-hub:` references (default: its own)."""
    path = _local(checkpoint, cache_dir, (hub.CONFIG_FILE, hub.WEIGHTS_FILE))
    metadata = {}
    if path.is_dir() and not hub.is_model_folder(path):
        state, config = consolidated_state(path)
    else:
        weights = path / hub.WEIGHTS_FILE if hub.is_model_folder(path) else path
        state, config = read_model_file(weights)
        metadata = read_model_metadata(weights)  # a prompt-tuned model's label set
        if hub.is_model_folder(path):
            hub.read_folder_config(path)  # what get_tokenizer reads must be what the weights were built with
    config = with_eval_capacity(config, capacity_factor)
    return model_with(state, config, path, metadata).to(device).eval(), config


def read_config(checkpoint: str | Path, cache_dir: Optional[str] = None) -> Config:
    """The config of any checkpoint reference, without reading (or downloading) its weights; a
    workdir's is that of its newest complete checkpoint."""
    path = _local(checkpoint, cache_dir, (hub.CONFIG_FILE,))
    if hub.is_model_folder(path):
        return hub.read_folder_config(path)
    if path.is_dir():
        return checkpoint_config(checkpoint_at(path))
    return read_embedded_config(path)


def _local(checkpoint: str | Path, cache_dir: Optional[str], files: tuple[str, ...]) -> Path:
    """The local path of a checkpoint reference (an `hf-hub:` one is fetched into the cache)."""
    if hub.is_hub_reference(checkpoint):
        return hub.fetch(str(checkpoint), files, cache_dir)
    return Path(checkpoint)
