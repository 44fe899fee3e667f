"""Slot assignment with capacity: Batch Priority Routing (BPR) or first-come-first-served.

Math, per routing group of S tokens with a top-1 expert each: visit the tokens in priority order
(BPR: gate descending, ties by position; vanilla: position), give each the next free slot of its
expert, and drop it (slot −1) once that expert already holds `capacity` tokens. A dropped token is
never re-routed. Tokens with expert −1 (padding) take no slot and count for nothing.

In other words slot = the number of same-expert tokens ahead of it in priority order, kept if
below capacity: a per-expert exclusive prefix count. The Triton path sorts the gates with
torch.sort (stable, so ties keep position order) and counts in two parallel passes over chunks of
the priority order: (1) per-chunk expert histograms, (2) an exclusive scan of those across chunks
(tiny, in PyTorch) plus a scan inside each chunk, written straight back to token positions. No
pass is sequential over the group, so one big group runs as fast as many small ones.
Nothing here is differentiable: slots are indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_device, check_float, check_index


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


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _chunk_one_hot(expert_ptr, order_ptr, S, E, HAS_ORDER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """The chunk (group, chunk) of the priority order: token positions [BLOCK_S] and their one-hot experts."""
    group = tl.program_id(0).to(tl.int64)
    rank = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S] place in priority order
    in_group = rank < S
    if HAS_ORDER:
        token = tl.load(order_ptr + group * S + rank, mask=in_group, other=0)
    else:
        token = rank.to(tl.int64)
    expert = tl.load(expert_ptr + group * S + token, mask=in_group, other=-1)
    real = (expert >= 0) & (expert < E)  # padding (−1) matches no expert
    one_hot = (expert[:, None] == tl.arange(0, BLOCK_E)[None, :]) & real[:, None]  # [BLOCK_S, BLOCK_E]
    return token, in_group, one_hot.to(tl.int32)


@triton.jit
def _chunk_counts_kernel(
    expert_ptr, order_ptr, counts_ptr, S, E, HAS_ORDER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr
):
    """counts[g, c, e] = how many tokens of chunk c of group g's priority order chose expert e."""
    _, _, one_hot = _chunk_one_hot(expert_ptr, order_ptr, S, E, HAS_ORDER, BLOCK_S, BLOCK_E)
    cols = tl.arange(0, BLOCK_E)
    chunk = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    tl.store(counts_ptr + chunk * E + cols, tl.sum(one_hot, axis=0), mask=cols < E)


@triton.jit
def _chunk_slots_kernel(
    expert_ptr, order_ptr, ahead_ptr, slot_ptr, S, E, capacity,
    HAS_ORDER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """slot = same-expert tokens ahead in earlier chunks (ahead[g, c, e]) + ahead within this chunk."""
    token, in_group, one_hot = _chunk_one_hot(expert_ptr, order_ptr, S, E, HAS_ORDER, BLOCK_S, BLOCK_E)
    cols = tl.arange(0, BLOCK_E)
    chunk = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    ahead = tl.load(ahead_ptr + chunk * E + cols, mask=cols < E, other=0)  # [BLOCK_E]
    within = tl.cumsum(one_hot, axis=0) - one_hot  # [BLOCK_S, BLOCK_E] exclusive count
    position = tl.sum((within + ahead[None, :]) * one_hot, axis=1)  # [BLOCK_S]
    kept = (tl.sum(one_hot, axis=1) > 0) & (position < capacity)
    slot = tl.where(kept, position, -1).to(tl.int64)
    tl.store(slot_ptr + tl.program_id(0).to(tl.int64) * S + token, slot, mask=in_group)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _check_slot_inputs(expert: Tensor, gate: Tensor, num_experts: int, capacity: int) -> None:
    if expert.dim() != 2:
        raise ValueError(f"assign_slots: expert must be [G, S], got {list(expert.shape)}")
    check_index("assign_slots", "expert", expert, tuple(expert.shape))
    if gate.shape != expert.shape:
        raise ValueError(f"assign_slots: gate {list(gate.shape)} must match expert {list(expert.shape)}")
    check_float("assign_slots", "gate", gate)
    if num_experts < 1 or capacity < 0:
        raise ValueError(f"assign_slots: need num_experts ≥ 1 and capacity ≥ 0, got {num_experts}, {capacity}")
    check_device("assign_slots", expert, gate)


def _assign_slots(expert: Tensor, gate: Tensor, num_experts: int, capacity: int, batch_priority: bool) -> Tensor:
    """Sort by priority (BPR only), count per chunk, scan the counts, write each token's slot."""
    _check_slot_inputs(expert, gate, num_experts, capacity)
    expert = expert.contiguous()
    groups, size = expert.shape
    slot = torch.empty_like(expert)  # [G, S]
    if expert.numel() == 0:
        return slot
    # BPR visits tokens by gate, descending; the stable sort keeps ties in position order, as the
    # reference does. Vanilla order is position order: the kernels then ignore `order` (any pointer).
    order = torch.sort(gate.float(), dim=1, descending=True, stable=True).indices if batch_priority else expert
    block_e = triton.next_power_of_2(num_experts)
    block_s = min(triton.next_power_of_2(size), max(16, 4096 // block_e))
    grid = (groups, triton.cdiv(size, block_s))
    counts = expert.new_empty(groups, grid[1], num_experts, dtype=torch.int32)  # [G, chunks, E]
    meta = dict(HAS_ORDER=batch_priority, BLOCK_S=block_s, BLOCK_E=block_e)
    _chunk_counts_kernel[grid](expert, order, counts, size, num_experts, **meta)
    ahead = counts.cumsum(dim=1, dtype=torch.int32) - counts  # [G, chunks, E] exclusive over chunks
    _chunk_slots_kernel[grid](expert, order, ahead, slot, size, num_experts, capacity, **meta)
    return slot


# ---------------------------------------------------------------------------------------------
# Op (indices only: no autograd)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("limoe_kernels::assign_slots", mutates_args=())
def assign_slots(expert: Tensor, gate: Tensor, num_experts: int, capacity: int, batch_priority: bool) -> Tensor:
    """Triton: expert [G, S] int64 (−1 = padding), gate [G, S] → slot [G, S] int64 (−1 = dropped)."""
    return _assign_slots(expert, gate, num_experts, capacity, batch_priority)


@assign_slots.register_fake
def _(expert: Tensor, gate: Tensor, num_experts: int, capacity: int, batch_priority: bool) -> Tensor:
    return torch.empty_like(expert)
