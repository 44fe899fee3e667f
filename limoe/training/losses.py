"""The training objective: the contrastive loss plus the weighted auxiliary routing losses.

The auxiliary losses' formulas live with the model (`limoe.model.aux_losses`), which computes
them per routing group; this module weights them by the `LossConfig` and sums them over layers.
Each is a mean over routing groups (or tokens) of the whole batch, so a micro-batch's share is
its own mean weighted by its part of the batch's groups (or tokens): `RoutingCounts`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn

from limoe.config import LossConfig
from limoe.distributed import rank_and_world
from limoe.model.aux_losses import masked_group_mean, thresholded_global_entropy
from limoe.model.routing import LayerRouting


@dataclass
class RoutingCounts:
    """The sizes one MoE layer's auxiliary losses are averaged over; they add up over micro-batches."""

    groups: int  # routing groups (importance and load are means over groups)
    tokens: Tensor  # [] routed tokens, padding excluded (the z-loss is a mean over tokens)
    present: Tensor  # [M] groups holding tokens of modality m (the entropy losses' means)

    @classmethod
    def of(cls, routing: LayerRouting) -> "RoutingCounts":
        return cls(routing.num_groups, routing.routed.detach().sum(), routing.present.sum(dim=0).to(routing.routed.dtype))

    def __add__(self, other: "RoutingCounts") -> "RoutingCounts":
        return RoutingCounts(self.groups + other.groups, self.tokens + other.tokens, self.present + other.present)


def whole_batch_counts(micro_batches: list[list[LayerRouting]]) -> list[RoutingCounts]:
    """Per MoE layer, the counts of all micro-batches together (each gives one routing record per layer)."""
    per_layer = zip(*([RoutingCounts.of(r) for r in routing] for routing in micro_batches))
    return [sum(counts[1:], counts[0]) for counts in per_layer]


def auxiliary_loss(routings: list[LayerRouting], config: LossConfig, device: torch.device = torch.device("cpu"),
                   whole_batch: Optional[list[RoutingCounts]] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted auxiliary loss summed over MoE layers; returns the total and its weighted parts.

    `whole_batch` (one `RoutingCounts` per layer) makes this a micro-batch's share of the loss of
    the batch those counts describe: each mean over groups or tokens is weighted by the micro-batch's
    part of them, so the shares of all micro-batches sum to the whole batch's loss. Without it, the
    batch is whole (every weight is 1). A model without MoE layers (the dense twin) gets a zero on `device`.

    The entropy losses are per modality of the model (`config`'s per-modality keys name them, in id
    order); each is a mean over the groups holding that modality's tokens, so a modality absent
    from the batch (an audio-text batch's images) contributes exactly 0. The importance and load
    losses, like Batch Priority Routing, do not look at modalities.
    """
    if not routings:
        return torch.zeros((), device=device), {}
    mine = [RoutingCounts.of(r) for r in routings]
    whole = mine if whole_batch is None else whole_batch
    group_share = [m.groups / w.groups for m, w in zip(mine, whole)]
    token_share = [m.tokens / w.tokens.clamp(min=1) for m, w in zip(mine, whole)]
    present_share = [m.present / w.present.clamp(min=1) for m, w in zip(mine, whole)]  # [M] each
    names = list(config.local_entropy)  # the model's modalities, in id order (`Config` fills every key so)
    if len(names) != routings[0].present.shape[1]:
        raise ValueError(f"the loss config names {len(names)} modalities ({names}) but the routing records hold "
                         f"{routings[0].present.shape[1]}; build it with LossConfig.for_modalities(model.modalities).")
    min_experts = [config.global_entropy_min_experts[m] for m in names]
    local = sum(masked_group_mean(r.token_entropy, r.present) * s for r, s in zip(routings, present_share))  # [M]
    global_ = sum(thresholded_global_entropy(r.marginal_entropy, r.present, min_experts) * s
                  for r, s in zip(routings, present_share))  # [M]
    parts = {
        "importance": config.importance * sum(r.importance * s for r, s in zip(routings, group_share)),
        "load": config.load * sum(r.load * s for r, s in zip(routings, group_share)),
    }
    if config.router_z:
        parts["router_z"] = config.router_z * sum(r.z * s for r, s in zip(routings, token_share))
    for index, name in enumerate(names):  # a modality with no tokens in the batch is in no group: 0
        for term, value in zip(PER_MODALITY_TERMS, (local[index], global_[index])):
            parts[f"{term}_{name}"] = getattr(config, term)[name] * value
    return sum(parts.values()), parts


PER_MODALITY_TERMS = ("local_entropy", "global_entropy")  # `auxiliary_loss` parts named `<term>_<modality>`


def without_absent_modalities(parts: dict[str, Tensor], present: Sequence[str], modalities: Sequence[str]
                              ) -> dict[str, Tensor]:
    """`auxiliary_loss` parts without the per-modality terms of those of the model's `modalities`
    not among `present` (what a co-training task feeds the model): such a term is 0 because the
    modality is absent, not because its routing is balanced, so it is not reported at all."""
    absent = {f"{term}_{name}" for term in PER_MODALITY_TERMS for name in modalities if name not in present}
    return {key: value for key, value in parts.items() if key not in absent}


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (open_clip `ClipLoss`) or sigmoid loss (`SigLipLoss`) over the global batch.

    When torch.distributed is initialised, features from every data-parallel rank are gathered
    with gradients, so each pair sees the whole global batch as negatives. The temperature and
    SigLIP's bias are the model's (`LimoeOutput.logit_scale`, `.logit_bias`), as in open_clip. With
    `local_loss` each rank's loss covers its own pairs' rows, so the loss differs between ranks;
    their mean is the global loss.
    """

    def __init__(self, kind: str, local_loss: bool = True, rank_and_world_size: Optional[tuple[int, int]] = None):
        super().__init__()
        rank, world = rank_and_world_size or rank_and_world()
        self.kind = kind
        if kind == "siglip":
            self.loss = SigLipLoss(rank=rank, world_size=world)
        else:
            # local_loss: this rank's rows of the logits, B_local × B_global per direction; with the
            # gather's gradient summed over ranks, the gradient equals the full B_global² loss's.
            self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)

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
