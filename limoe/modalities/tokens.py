"""`Tokens`: one modality's embedded batch, as its embedder hands it to the tower (`limoe.model.tower`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass(frozen=True)
class Tokens:
    """One modality's embedded tokens, on their way into the tower and out of it."""

    x: Tensor  # [B, N, d]
    modality: Tensor  # [B, N] the modality's id per token (limoe.modalities), PADDING where padded
    key_mask: Optional[Tensor]  # [B, N] True where attention may look (None: everywhere)
    name: str  # the modality's name: its pooling head, its copy of a modality adapter block
    ids: Optional[Tensor] = None  # [B, N] token ids, which `eos` pooling reads (None for patches)
