"""The V-MoE and LIMoE auxiliary routing losses, as formulas over per-group sums.

The MoE layer computes the per-group terms inside its router op (importance, load, z-loss, token
and marginal entropies; `limoe_kernels.router` holds their PyTorch reference, re-exported here) and
returns them in its `LayerRouting`; `limoe.training.losses.auxiliary_loss` thresholds, weights and
sums them over layers with the two functions below. Every loss is computed per group and averaged
over groups.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The per-group formulas run inside the router op; their PyTorch reference lives with it.
from limoe_kernels.router import (  # noqa: F401  (re-exported: the formulas of every auxiliary loss are named here)
    importance_loss,
    load_loss,
    modality_entropies,
    router_z_loss,
    squared_coefficient_of_variation,
)


def masked_group_mean(values: Tensor, present: Tensor) -> Tensor:
    """Mean over groups where the modality is present. values, present [G, M] → [M]."""
    weights = present.to(values.dtype)
    return (values * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1)


def thresholded_global_entropy(marginal_entropy: Tensor, present: Tensor, min_experts: list[float]) -> Tensor:
    """LIMoE global entropy loss per modality: mean over groups of max(0, log S_m − H(p̄_m)).

    marginal_entropy, present [G, M]; min_experts: S_m per modality → [M]. Once a modality spreads
    over at least S_m experts' worth of entropy the loss is off; below it, it pushes to use more.
    """
    thresholds = marginal_entropy.new_tensor([math.log(s) for s in min_experts])  # [M]
    gap = torch.relu(thresholds[None, :] - marginal_entropy)  # [G, M]
    return masked_group_mean(gap, present)
