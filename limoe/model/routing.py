"""Routing groups and expert capacity: the bookkeeping around the top-1 router.

Tokens are routed in groups (V-MoE: a few images' worth each); capacity and Batch Priority
Routing act inside a group. LIMoE routes an example's image patches and caption tokens in the
same group, so the two modalities compete for the same expert slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from limoe_kernels.router import entropy  # noqa: F401  (Shannon entropy, re-exported for the statistics)


def expert_capacity(group_tokens: int, num_experts: int, capacity_factor: Optional[float], top_k: int = 1) -> int:
    """Slots per expert per group: ceil(k·S·c/E) rounded up to a multiple of 4.

    `capacity_factor=None` is dropless: every token of the group fits in any one expert.
    """
    if capacity_factor is None:
        slots = group_tokens
    else:
        slots = math.ceil(top_k * group_tokens * capacity_factor / num_experts)
    return 4 * math.ceil(slots / 4)


@dataclass(frozen=True)
class Grouping:
    """How a batch of B examples (N tokens each) is split into G groups of `per_group` examples.

    The examples are spread evenly: G = ceil(B / group_size), then ceil(B / G) examples per group,
    the last group padded with empty examples, so a small batch is not diluted by padding.
    """

    batch: int
    per_group: int
    num_groups: int

    @classmethod
    def for_batch(cls, batch: int, group_size: int) -> "Grouping":
        num_groups = math.ceil(batch / group_size)
        return cls(batch, math.ceil(batch / num_groups), num_groups)

    @property
    def padded_batch(self) -> int:
        return self.per_group * self.num_groups

    def group(self, x: Tensor, fill) -> Tensor:
        """[B, N, ...] → [G, per_group·N, ...], padding examples filled with `fill`."""
        pad = self.padded_batch - self.batch
        if pad:
            x = torch.cat([x, x.new_full((pad, *x.shape[1:]), fill)])
        return x.reshape(self.num_groups, -1, *x.shape[2:])

    def ungroup(self, x: Tensor, tokens_per_example: int) -> Tensor:
        """[G, per_group·N, ...] → [B, N, ...] (padding examples dropped)."""
        x = x.reshape(self.padded_batch, tokens_per_example, *x.shape[2:])
        return x if self.padded_batch == self.batch else x[: self.batch]


def _merged_by(rule: Callable[[list, Sequence["LayerRouting"]], Any]):
    """A `LayerRouting` field whose micro-batch values combine into the whole batch's by
    `rule(values, records)` (see `LayerRouting.merge`)."""
    return field(metadata={"merge": rule})


def _group_mean(values: list[Tensor], records: Sequence["LayerRouting"]) -> Tensor:
    """A mean over groups: each micro-batch weighted by its groups."""
    return sum(v * r.num_groups for v, r in zip(values, records)) / sum(r.num_groups for r in records)


def _token_mean(values: list[Tensor], records: Sequence["LayerRouting"]) -> Tensor:
    """A mean over routed tokens (padding excluded): each micro-batch weighted by its tokens."""
    tokens = [r.routed.detach().sum() for r in records]  # [] each
    return sum(v * t for v, t in zip(values, tokens)) / sum(tokens).clamp(min=1)


def _total(values: list, records: Sequence["LayerRouting"]):
    return sum(values)


def _concatenated(values: list[Tensor], records: Sequence["LayerRouting"]) -> Tensor:
    """Per-group or per-example rows: the micro-batches' rows one after the other."""
    return torch.cat(values)


def _first(values: list, records: Sequence["LayerRouting"]):
    """A setting every micro-batch shares."""
    return values[0]


@dataclass
class LayerRouting:
    """What one MoE layer's routing did for one batch: the auxiliary-loss inputs and statistics.
    M is the number of the model's modalities; row m is its modality whose id is m (`model.modalities`).

    Everything stays a tensor (no host sync in the training step); the counts and sums are
    additive, so batches and ranks combine by summing them. Each field declares how the records of
    a batch's micro-batches combine into the whole batch's (`merge`); a field without a rule
    cannot be merged, so none is forgotten.
    """

    importance: Tensor = _merged_by(_group_mean)  # [] V-MoE importance CV², mean over groups
    load: Tensor = _merged_by(_group_mean)  # [] V-MoE load CV², mean over groups
    z: Tensor = _merged_by(_token_mean)  # [] router z-loss
    token_entropy: Tensor = _merged_by(_concatenated)  # [G, M] mean H(p(x)) over the group's tokens of modality m
    marginal_entropy: Tensor = _merged_by(_concatenated)  # [G, M] H(mean p(x)) over the same tokens
    present: Tensor = _merged_by(_concatenated)  # [G, M] bool, the group holds tokens of modality m
    routed: Tensor = _merged_by(_total)  # [M, E] tokens whose top-1 expert is e
    kept: Tensor = _merged_by(_total)  # [M, E] of those, the ones that got a slot under capacity
    prob_sum: Tensor = _merged_by(_total)  # [M, E] Σ p(x) over modality m's tokens
    entropy_sum: Tensor = _merged_by(_total)  # [M] Σ H(p(x)) over modality m's tokens
    expert: Tensor = _merged_by(_concatenated)  # [B, N] top-1 expert per token, −1 for padding
    kept_mask: Tensor = _merged_by(_concatenated)  # [B, N] bool, the token got a slot
    capacity: int = _merged_by(_first)  # slots per expert per group
    num_groups: int = _merged_by(_total)  # routing groups in this call: each expert had capacity × num_groups slots

    @classmethod
    def merge(cls, records: Sequence["LayerRouting"]) -> "LayerRouting":
        """One layer's records of a batch's micro-batches (in batch order) as the record of the whole batch."""
        return cls(**{f.name: f.metadata["merge"]([getattr(r, f.name) for r in records], records) for f in fields(cls)})

    def summary(self) -> dict[str, Tensor]:
        """Batch-level statistics per modality: dropped fraction, mean gate entropy, marginal entropy."""
        tokens = self.routed.sum(dim=-1).clamp(min=1)  # [M]
        return {
            "dropped": 1.0 - self.kept.sum(dim=-1) / tokens,
            "token_entropy": self.entropy_sum / tokens,
            "marginal_entropy": entropy(self.prob_sum / tokens[:, None]),
            "experts_used": (self.routed > 0).sum(dim=-1),
        }
