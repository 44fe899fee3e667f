"""Slot assignment with capacity: Batch Priority Routing (BPR) or first-come-first-served.

Math, per routing group of S tokens with a top-1 expert each: visit the tokens in priority order
(BPR: gate descending, ties by position; vanilla: position), give each the next free slot of its
expert, and drop it (slot −1) once that expert already holds `capacity` tokens. A dropped token is
never re-routed. Tokens with expert −1 (padding) take no slot and count for nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor


def assign_slots_reference(
    expert: Tensor, gate: Tensor, num_experts: int, capacity: int, batch_priority: bool
) -> Tensor:
    """Plain PyTorch: expert [G, S] int64 (−1 = padding), gate [G, S] → slot [G, S] int64 (−1 = dropped)."""
    groups, size = expert.shape
    if batch_priority:
        order = torch.sort(gate.float(), dim=1, descending=True, stable=True).indices  # [G, S]
    else:
        order = torch.arange(size, device=expert.device).expand(groups, size)
    sorted_expert = expert.gather(1, order)  # [G, S]
    padding = sorted_expert < 0
    one_hot = torch.nn.functional.one_hot(sorted_expert.clamp(min=0), num_experts)  # [G, S, E]
    one_hot = one_hot.masked_fill(padding[..., None], 0)
    position = (one_hot.cumsum(dim=1) - 1).gather(2, sorted_expert.clamp(min=0)[..., None]).squeeze(-1)
    sorted_slot = torch.where(padding | (position >= capacity), -1, position)  # [G, S]
    return torch.empty_like(sorted_slot).scatter_(1, order, sorted_slot)
