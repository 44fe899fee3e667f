"""The V-MoE and LIMoE auxiliary routing losses, as formulas over per-group sums.

The MoE layer computes these per routing group (it has the groups at hand) and returns them in its
`LayerRouting`; `limoe.training.losses.auxiliary_loss` weights and sums them over layers. Every
loss is computed per group and averaged over groups.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from limoe.model.routing import entropy


def squared_coefficient_of_variation(values: Tensor) -> Tensor:
    """(std/mean)² along the last axis with the population std: V-MoE's balance penalty."""
    return values.var(dim=-1, unbiased=False) / values.mean(dim=-1).pow(2).clamp(min=1e-12)


def importance_loss(prob_sum: Tensor) -> Tensor:
    """V-MoE importance loss. prob_sum [G, M, E]: Σ p_e(x) per group, modality and expert → scalar.

    Imp_e = Σ_x p_e(x) over all the group's tokens; loss = CV(Imp)², averaged over groups.
    """
    return squared_coefficient_of_variation(prob_sum.sum(dim=1)).mean()


def load_loss(load_sum: Tensor, counts: Tensor) -> Tensor:
    """V-MoE load loss. load_sum [G, M, E], counts [G, M] tokens → scalar.

    load_sum holds Σ_x P(expert e is chosen for x) = Σ_x Φ((ℓ_e(x) − t(x)) / σ), t(x) the winning
    noisy logit: the probability that fresh noise lifts ℓ_e over the winner. load_e = mean over
    the group's tokens; loss = CV(load)², averaged over groups.
    """
    load = load_sum.sum(dim=1) / counts.sum(dim=1, keepdim=True).clamp(min=1)  # [G, E]
    return squared_coefficient_of_variation(load).mean()


def router_z_loss(z_sum: Tensor, counts: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)². z_sum, counts [G, M]."""
    return z_sum.sum() / counts.sum().clamp(min=1)


def modality_entropies(prob_sum: Tensor, entropy_sum: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per group and modality: mean token entropy, marginal entropy, and whether present.

    prob_sum [G, M, E] Σ p(x), entropy_sum [G, M] Σ H(p(x)), counts [G, M] tokens →
      token_entropy [G, M]:    mean over m's tokens of H(p(x))       (LIMoE local entropy)
      marginal_entropy [G, M]: H(mean over m's tokens of p(x))       (LIMoE global entropy)
      present [G, M] bool:     the group has tokens of modality m
    Each modality is normalised by its own token count, so a short caption weighs as much as
    an image's many patches.
    """
    tokens = counts.clamp(min=1)
    return entropy_sum / tokens, entropy(prob_sum / tokens[..., None]), counts > 0


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
