"""What `limoe routing` records about each checkpoint: its statistics and its pictured examples.

The command fills these records and the pictures draw them; both import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from limoe.config import Config
from limoe.routing_report.statistics import collapse_warnings


@dataclass
class ExampleRouting:
    """One image-caption or clip-caption pair's top-1 experts in the pictured block."""

    key: str
    # as the model saw it: the image [H, W, 3] in [0, 1], an audio clip's normalised log-mel [n_mels, frames],
    # or a video clip's first frame of each tubelet step side by side [S, steps · S, 3] in [0, 1]
    picture: np.ndarray
    # [g, g] expert per image patch, row-major like the patch grid; [F, T] per spectrogram patch, frequency × time;
    # [steps, g, g] per tubelet of a video clip, one row-major grid per tubelet step
    patch_experts: Tensor
    patch_kept: Tensor  # same shape, bool: the patch got a slot
    tokens: list[str]  # decoded caption tokens, padding left out
    token_experts: list[int]
    token_kept: list[bool]
    modality: str = "image"  # what `picture` and the patches are of: image, audio or video

    def to_json(self) -> dict:
        return {"key": self.key, "patch_experts": self.patch_experts.tolist(), "patch_kept": self.patch_kept.tolist(),
                "tokens": self.tokens, "token_experts": self.token_experts, "token_kept": self.token_kept}


@dataclass
class CheckpointRouting:
    """Everything the report says about one checkpoint."""

    name: str
    path: Path
    config: Config
    block: int  # the MoE block in the example pictures
    statistics: dict  # RoutingAccumulator.statistics()
    examples: list[ExampleRouting]
    modality: str = "image"  # what the captions were read with: image, audio or video (`limoe routing --modality`)

    def to_json(self) -> dict:
        return {
            "name": self.name, "checkpoint": str(self.path), "model": self.config.model.name,
            "capacity_factor": self.config.model.moe.eval_capacity_factor, "pictured_block": self.block,
            "statistics": self.statistics, "collapse_warnings": collapse_warnings(self.statistics),
            "examples": [example.to_json() for example in self.examples],
        }
