"""The modalities one tower embeds, and a number per modality for the keys that hold one."""

from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class PerModality:
    """One number per modality (loss weights, entropy thresholds); the key holding it says which
    values are valid."""

    image: float
    text: float

    def __getitem__(self, modality: str) -> float:
        return getattr(self, modality)
