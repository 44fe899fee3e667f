"""The five ops composed into one top-1 MoE layer, as a model composes them.

Kernel tests and the layer benchmark use this to check and time the ops together, without the
model around them: route, assign slots, dispatch into the expert-major buffer, run the experts,
combine back with the gate.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import expert_major_rows
from .router import RouterOutput


def top1_moe_layer(
    ops, x: Tensor, w_router: Tensor, ffn: list[Tensor], noise: Optional[Tensor], groups: int, capacity: int,
    batch_priority: bool = True, padding: Optional[Tensor] = None,
) -> tuple[Tensor, RouterOutput]:
    """The top-1 MoE layer from the five ops, composed as the model's MoE layer composes them:
    x [T, d], w_router [d, E], ffn = (w_in, b_in, w_out, b_out), padding [T] bool → (y [T, d], router).
    Tokens are one modality; padding tokens take no slot and are in none of the router's sums."""
    tokens, d = x.shape
    num_experts = w_router.shape[1]
    size = tokens // groups
    modality = torch.zeros(tokens, dtype=torch.int64, device=x.device) if padding is None else -padding.long()
    router = ops.top1_router(x @ w_router, noise, modality, size)
    expert = router.expert.view(groups, size)  # [G, S], −1 for padding
    slot = ops.assign_slots(expert, router.gate.view(groups, size), num_experts, capacity, batch_priority)
    row = expert_major_rows(expert, slot, capacity)  # [T]
    num_rows = num_experts * groups * capacity
    buf = ops.dispatch(x, row, num_rows).view(num_experts, groups * capacity, d)
    out = ops.expert_ffn(buf, *ffn)  # [E, G·C, d]
    return ops.combine(out.view(num_rows, d), row, router.gate), router
