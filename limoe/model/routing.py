"""Routing groups and expert capacity: the bookkeeping around the top-1 router.

Tokens are routed in groups (V-MoE: a few images' worth each); capacity and Batch Priority
Routing act inside a group. LIMoE routes an example's image patches and caption tokens in the
same group, so the two modalities compete for the same expert slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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


@dataclass
class LayerRouting:
    """What one MoE layer's routing did for one batch: the auxiliary-loss inputs and statistics.
    M is the number of modalities; row m is the modality whose id is m (`limoe.modalities`).

    Everything stays a tensor (no host sync in the training step); the counts and sums are
    additive, so batches and ranks combine by summing them.
    """

    importance: Tensor  # [] V-MoE importance CV², mean over groups
    load: Tensor  # [] V-MoE load CV², mean over groups
    z: Tensor  # [] router z-loss
    token_entropy: Tensor  # [G, M] mean H(p(x)) over the group's tokens of modality m
    marginal_entropy: Tensor  # [G, M] H(mean p(x)) over the same tokens
    present: Tensor  # [G, M] bool, the group holds tokens of modality m
    routed: Tensor  # [M, E] tokens whose top-1 expert is e
    kept: Tensor  # [M, E] of those, the ones that got a slot under capacity
    prob_sum: Tensor  # [M, E] Σ p(x) over modality m's tokens
    entropy_sum: Tensor  # [M] Σ H(p(x)) over modality m's tokens
    expert: Tensor  # [B, N] top-1 expert per token, −1 for padding
    kept_mask: Tensor  # [B, N] bool, the token got a slot
    capacity: int  # slots per expert per group
    num_groups: int  # routing groups in this call: each expert had capacity × num_groups slots

    def summary(self) -> dict[str, Tensor]:
        """Batch-level statistics per modality: dropped fraction, mean gate entropy, marginal entropy."""
        tokens = self.routed.sum(dim=-1).clamp(min=1)  # [M]
        return {
            "dropped": 1.0 - self.kept.sum(dim=-1) / tokens,
            "token_entropy": self.entropy_sum / tokens,
            "marginal_entropy": entropy(self.prob_sum / tokens[:, None]),
            "experts_used": (self.routed > 0).sum(dim=-1),
        }
