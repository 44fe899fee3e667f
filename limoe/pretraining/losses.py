"""The masked-modelling losses: MAE's normalised-patch MSE on hidden patches (an image's pixels,
AudioMAE's log-mel values), and cross-entropy on the masked caption tokens (BERT)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def normalized_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's target (`norm_pix_loss`, which AudioMAE keeps for spectrograms): each patch's values minus
    their mean, over their standard deviation. patches [B, N, P] → [B, N, P]; a flat patch (a white
    background, silence) becomes all zeros."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def patch_errors(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per patch. prediction, target [B, N, P] → [B, N]."""
    return (prediction.float() - target.float()).pow(2).mean(dim=-1)


def masked_patch_loss(prediction: Tensor, target: Tensor, hidden: Tensor) -> Tensor:
    """Mean over hidden patches only (hidden [B, N] bool): the visible ones are not predicted."""
    weights = hidden.to(prediction.dtype)
    return (patch_errors(prediction, target) * weights).sum() / weights.sum().clamp(min=1)


def masked_token_loss(logits: Tensor, targets: Tensor, divisor: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy over the predicted tokens. logits [T, V], targets [T].

    Both are sums over the T tokens divided by `divisor` (default T). With data parallelism the
    objective passes the global count over the number of ranks, so that the mean of the ranks'
    losses — what averaging their gradients optimises — is the mean over the global batch, however
    the masked tokens fall on the ranks. With no token to predict both are 0 (the loss keeps a graph).
    """
    divisor = logits.new_tensor(targets.numel()) if divisor is None else divisor
    divisor = divisor.clamp(min=1e-6)  # 0 / 0 → 0
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / divisor
    accuracy = (logits.argmax(dim=-1) == targets).sum() / divisor
    return loss, accuracy
