"""`Tokens`: one modality's embedded batch, as its embedder hands it to the tower (`limoe.model.tower`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tokens:
    """One modality's embedded tokens, on their way into the tower and out of it."""

    x: Tensor  # [B, N, d]
    modality: Tensor  # [B, N] the modality's id per token (limoe.modalities), PADDING where padded
    key_mask: Optional[Tensor]  # [B, N] True where attention may look (None: everywhere)
    name: str  # the modality's name: its pooling head, its copy of a modality adapter block
    ids: Optional[Tensor] = None  # [B, N] token ids, which `eos` pooling reads (None for patches)


def patch_tokens(x: Tensor, positions: Tensor, cls_token: Optional[Tensor], keep: Optional[Tensor],
                 modality_id: int, name: str) -> Tokens:
    """Patch embeddings x [B, N, d] (image or spectrogram patches) → their `Tokens`: plus learned
    positions [≥ N, d] (the first N), only the patches in `keep` [B, K] when given, and a leading
    class token [1, 1, d] when given. Every token is real and tagged with `modality_id`.

    `keep` selects before any block, so attention, routing groups, expert capacity and Batch
    Priority Routing all work on the K kept tokens (MAE's visible patches, FLIP's kept share).
    """
    x = x + positions[: x.shape[1]]  # [B, N, d]
    if keep is not None:
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, d]
    if cls_token is not None:
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    modality = torch.full(x.shape[:2], modality_id, device=x.device, dtype=torch.long)
    return Tokens(x, modality, None, name)
