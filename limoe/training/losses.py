"""The training objective: the contrastive loss plus the weighted auxiliary routing losses.

The auxiliary losses' formulas live with the model (`limoe.model.aux_losses`), which computes
them per routing group; this module weights them by the `LossConfig` and sums them over layers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn

from limoe.config import MODALITIES, LossConfig
from limoe.distributed import rank_and_world
from limoe.model.aux_losses import masked_group_mean, thresholded_global_entropy
from limoe.model.routing import LayerRouting


def auxiliary_loss(routings: list[LayerRouting], config: LossConfig,
                   device: torch.device = torch.device("cpu")) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted auxiliary loss summed over MoE layers; returns the total and its weighted parts.

    A model without MoE layers (the dense twin) gets a zero on `device`.
    """
    if not routings:
        return torch.zeros((), device=device), {}
    min_experts = [config.global_entropy_min_experts[m] for m in MODALITIES]
    local = sum(masked_group_mean(r.token_entropy, r.present) for r in routings)  # [M]
    global_ = sum(thresholded_global_entropy(r.marginal_entropy, r.present, min_experts) for r in routings)  # [M]
    parts = {
        "importance": config.importance * sum(r.importance for r in routings),
        "load": config.load * sum(r.load for r in routings),
    }
    if config.router_z:
        parts["router_z"] = config.router_z * sum(r.z for r in routings)
    for index, name in enumerate(MODALITIES):
        parts[f"local_entropy_{name}"] = config.local_entropy[name] * local[index]
        parts[f"global_entropy_{name}"] = config.global_entropy[name] * global_[index]
    return sum(parts.values()), parts


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (open_clip `ClipLoss`) or sigmoid loss (`SigLipLoss`) over the global batch.

    When torch.distributed is initialised, features from every data-parallel rank are gathered
    with gradients, so each pair sees the whole global batch as negatives. The temperature and
    SigLIP's bias are the model's (`LimoeOutput.logit_scale`, `.logit_bias`), as in open_clip.
    """

    def __init__(self, kind: str):
        super().__init__()
        rank, world = rank_and_world()
        self.kind = kind
        if kind == "siglip":
            self.loss = SigLipLoss(rank=rank, world_size=world)
        else:
            self.loss = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Optional[Tensor] = None) -> Tensor:
        """Features [B, D] L2-normalised; logit_scale [1] the temperature (the exponent of the
        learned log-scale, as open_clip's losses take it); logit_bias [1] for SigLIP."""
        if self.kind == "siglip":
            return self.loss(image_features, text_features, logit_scale, logit_bias)
        return self.loss(image_features, text_features, logit_scale)


def clamp_logit_scale(logit_scale: nn.Parameter, max_scale: float = math.log(100.0)) -> None:
    """CLIP's practice: keep exp(logit_scale) ≤ 100 so the softmax temperature stays sane."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, max_scale)
