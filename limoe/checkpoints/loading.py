"""Loading a model for evaluation from whatever a user points at: an exported file or a workdir."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from limoe.checkpoints.model_file import model_with, read_model_file
from limoe.checkpoints.training import consolidated_state
from limoe.config import Config
from limoe.errors import LimoeError
from limoe.model.tower import Limoe


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
        state, config = consolidated_state(path)
    else:
        state, config = read_model_file(path)
    config = with_eval_capacity(config, capacity_factor)
    return model_with(state, config).to(device).eval(), config
