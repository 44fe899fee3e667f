"""Process groups and the expert-parallel exchange.

DeepSpeed owns the process groups (`deepspeed.init_distributed`, and its expert-parallel and
expert-data-parallel groups from `deepspeed.utils.groups`); this module holds the all-to-all
that carries the expert-major token buffer to the experts' ranks and back, and small helpers
for rank-aware code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_to_all_single


def experts_all_to_all(buffer: Tensor, group) -> Tensor:
    """[E, N, d] in global expert order → [E_local, ep·N, d]: every rank's slots for my experts.

    Rank r owns experts r·E_local … (r+1)·E_local − 1, i.e. chunk r of the expert axis.
    Received rows are ordered by source rank, so the way back is the inverse permutation.
    """
    ep = dist.get_world_size(group)
    experts, slots, width = buffer.shape
    received = all_to_all_single(torch.empty_like(buffer), buffer.contiguous(), group=group)  # [ep·E_l, N, d]
    received = received.view(ep, experts // ep, slots, width)  # [source rank, E_l, N, d]
    return received.transpose(0, 1).reshape(experts // ep, ep * slots, width)


def experts_all_to_all_back(local: Tensor, group) -> Tensor:
    """[E_local, ep·N, d] expert outputs → [E, N, d] for this rank's tokens, global expert order."""
    ep = dist.get_world_size(group)
    local_experts, total_slots, width = local.shape
    slots = total_slots // ep
    outgoing = local.view(local_experts, ep, slots, width).transpose(0, 1).contiguous()  # [dest rank, E_l, N, d]
    returned = all_to_all_single(torch.empty_like(outgoing), outgoing, group=group)  # [source rank, E_l, N, d]
    return returned.view(ep * local_experts, slots, width)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0
