"""`optim`: the optimizer and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from limoe.config.keys import setting
from limoe.errors import LimoeError


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay, linear warmup, then cosine or linear decay."""

    lr: float = setting(1e-3, "peak learning rate, reached at the end of the warmup", "(0, inf)")
    min_lr: float = setting(1e-5, "learning rate at the last step", "[0, inf)")
    weight_decay: float = setting(1e-4, "decoupled weight decay (not on norms, biases, embeddings, the logit "
                                        "scale)", "[0, inf)")
    betas: tuple[float, ...] = setting((0.9, 0.999), "Adam's β1 and β2", "[0, 1)")
    eps: float = setting(1e-8, "Adam's ε", "(0, inf)")
    warmup_steps: int = setting(10_000, "steps of linear warmup from 0 to lr", "[0, inf)")
    schedule: Literal["cosine", "linear"] = setting("linear", "decay from lr to min_lr after the warmup")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)", "[0, inf)")

    def __post_init__(self):
        if len(self.betas) != 2:
            raise LimoeError(f"optim.betas must be two numbers [β1, β2], got {list(self.betas)}.")
