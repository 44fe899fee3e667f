"""Slot assignment with capacity (Batch Priority Routing or first-come-first-served), and the row
order the expert GEMMs run in.

Math, per routing group of S tokens with a top-1 expert each: visit the tokens in priority order
(BPR: gate descending, ties by position; vanilla: position), give each the next free slot of its
expert, and drop it (slot −1) once that expert already holds `capacity` tokens. A dropped token is
never re-routed. Tokens with expert −1 (padding) take no slot and count for nothing. In other
words slot = the number of same-expert tokens ahead of it in priority order, kept if below
capacity: a per-expert exclusive prefix count.

Row order. The expert GEMMs run over kept tokens only, so the plan also lays all T tokens out in
one permutation: first the kept tokens sorted by (expert, group, slot), so each expert's rows are
one contiguous segment, then the tokens that were not kept (dropped or padding) sorted by
(group, priority order), the "tail". `row_of_token` and `token_of_row` are the permutation and
its inverse; `segment_start`/`segment_count` [E + 1] give each expert's rows and, last, the tail.
The kept counts per modality and expert come out of the same pass.

Kernels: BPR sorts the gates with torch.sort (stable, so ties keep position order). Then two
kernels: one program per group walks its chunks of the priority order and writes, per chunk,
the same-expert tokens ahead of it and the not-kept tokens ahead of it, and per group the kept
count of every expert; then one program per (group, chunk) scans inside its chunk with
`tl.cumsum`, adds those offsets and the other groups' kept counts (a few hundred integers), and
writes each token's slot, row and the inverse. No pass is sequential over more than a group's
chunks, and nothing here is differentiable: slots are indices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_device, check_float, check_index


class SlotPlan(NamedTuple):
    """Who is kept where, and the expert-sorted row order of all T = G·S tokens."""

    slot: Tensor  # [G, S] int64 slot within (group, expert); −1 = not kept (dropped or padding)
    row_of_token: Tensor  # [T] int64 the token's row in the expert-sorted order
    token_of_row: Tensor  # [T] int64 the inverse permutation
    segment_start: Tensor  # [E + 1] int64 first row of each expert's segment; entry E: the tail
    segment_count: Tensor  # [E + 1] int64 rows per segment: kept tokens per expert; entry E: not kept
    kept: Tensor  # [M, E] fp32 kept tokens per modality and expert


def _priority_order(gate: Tensor, batch_priority: bool) -> Tensor:
    """[G, S] token positions in priority order: by gate, descending and stable (BPR), or by position."""
    if batch_priority:
        return torch.sort(gate.float(), dim=1, descending=True, stable=True).indices
    return torch.arange(gate.shape[1], device=gate.device).expand(gate.shape)


def assign_slots_reference(
    expert: Tensor, gate: Tensor, modality: Tensor, num_experts: int, capacity: int, batch_priority: bool,
    num_modalities: int = 1,
) -> SlotPlan:
    """Plain PyTorch: expert [G, S] int64 (−1 = padding), gate [G, S], modality [G, S] → SlotPlan."""
    groups, size = expert.shape
    order = _priority_order(gate, batch_priority)  # [G, S]
    sorted_expert = expert.gather(1, order)  # [G, S]
    padding = sorted_expert < 0
    one_hot = torch.nn.functional.one_hot(sorted_expert.clamp(min=0), num_experts)  # [G, S, E]
    one_hot = one_hot.masked_fill(padding[..., None], 0)
    position = (one_hot.cumsum(dim=1) - 1).gather(2, sorted_expert.clamp(min=0)[..., None]).squeeze(-1)
    sorted_slot = torch.where(padding | (position >= capacity), -1, position)  # [G, S]
    slot = torch.empty_like(sorted_slot).scatter_(1, order, sorted_slot)
    kept = slot >= 0

    ranks = torch.arange(size, device=expert.device).expand(groups, size)
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # [G, S] place in priority order
    group = torch.arange(groups, device=expert.device)[:, None]
    tokens = groups * size
    key = torch.where(kept, expert * tokens + group * size + slot, num_experts * tokens + group * size + rank)
    token_of_row = torch.argsort(key.view(-1))  # keys are unique
    row_of_token = torch.empty_like(token_of_row).scatter_(0, token_of_row, torch.arange(tokens, device=expert.device))
    count = one_hot.sum(dim=1).clamp(max=capacity).sum(dim=0)  # [E] kept: each group's first `capacity`
    segment_count = torch.cat([count, (tokens - count.sum()).view(1)])
    segment_start = segment_count.cumsum(0) - segment_count
    masks = (modality[..., None] == torch.arange(num_modalities, device=expert.device)) & kept[..., None]  # [G, S, M]
    kept_counts = torch.einsum("gsm,gse->me", masks.float(),
                               torch.nn.functional.one_hot(expert.clamp(min=0), num_experts).float())
    return SlotPlan(slot, row_of_token, token_of_row, segment_start, segment_count, kept_counts)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _chunk_one_hot(expert_ptr, order_ptr, group, chunk, S, E, HAS_ORDER: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    """Chunk `chunk` of group `group`'s priority order: token positions [BLOCK_S], whether they
    exist, and their one-hot experts [BLOCK_S, BLOCK_E] (padding matches no expert)."""
    rank = chunk * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S] place in priority order
    in_group = rank < S
    if HAS_ORDER:
        token = tl.load(order_ptr + group * S + rank, mask=in_group, other=0)
    else:
        token = rank.to(tl.int64)
    expert = tl.load(expert_ptr + group * S + token, mask=in_group, other=-1)
    real = (expert >= 0) & (expert < E)
    one_hot = (expert[:, None] == tl.arange(0, BLOCK_E)[None, :]) & real[:, None]  # [BLOCK_S, BLOCK_E]
    return token, in_group, one_hot.to(tl.int32)


@triton.jit
def _group_counts_kernel(
    expert_ptr, order_ptr, ahead_ptr, dropped_ahead_ptr, kept_total_ptr, kept_ptr, S, E, capacity, CHUNKS, ME,
    HAS_ORDER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_ME: tl.constexpr,
):
    """Program g walks its group's chunks in priority order and writes, per chunk c,
    ahead[g, c, e] (tokens of expert e before the chunk) and dropped_ahead[g, c] (tokens before
    the chunk that are not kept), and kept_total[g, e] = min(tokens of e, capacity). Program 0
    also zeroes the kept-per-modality counts the slot kernel adds into."""
    group = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    running = tl.zeros([BLOCK_E], dtype=tl.int32)
    dropped = 0
    for chunk in range(CHUNKS):
        _, in_group, one_hot = _chunk_one_hot(expert_ptr, order_ptr, group, chunk, S, E, HAS_ORDER, BLOCK_S, BLOCK_E)
        counts = tl.sum(one_hot, axis=0)  # [BLOCK_E]
        tl.store(ahead_ptr + (group * CHUNKS + chunk) * E + cols, running, mask=cols < E)
        tl.store(dropped_ahead_ptr + group * CHUNKS + chunk, dropped)
        kept = tl.minimum(tl.maximum(capacity - running, 0), counts)
        dropped += tl.sum(in_group.to(tl.int32), axis=0) - tl.sum(kept, axis=0)
        running += counts
    tl.store(kept_total_ptr + group * E + cols, tl.minimum(running, capacity), mask=cols < E)
    if group == 0:
        me = tl.arange(0, BLOCK_ME)
        tl.store(kept_ptr + me, tl.zeros([BLOCK_ME], dtype=tl.float32), mask=me < ME)


@triton.jit
def _slots_kernel(
    expert_ptr, order_ptr, modality_ptr, ahead_ptr, dropped_ahead_ptr, kept_total_ptr,
    slot_ptr, row_of_token_ptr, token_of_row_ptr, segment_start_ptr, segment_count_ptr, kept_ptr,
    G, S, E, capacity, M: tl.constexpr,
    HAS_ORDER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Program (g, c): slot = same-expert tokens ahead in earlier chunks + ahead within this one;
    row = the expert's segment start + its kept tokens in earlier groups + slot, or, if not kept,
    the tail start + the group's place in the tail + not-kept tokens ahead in the group."""
    group = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    token, in_group, one_hot = _chunk_one_hot(expert_ptr, order_ptr, group, chunk, S, E, HAS_ORDER, BLOCK_S, BLOCK_E)
    cols = tl.arange(0, BLOCK_E)
    chunk_index = group * tl.num_programs(1) + chunk
    ahead = tl.load(ahead_ptr + chunk_index * E + cols, mask=cols < E, other=0)  # [BLOCK_E]
    within = tl.cumsum(one_hot, axis=0) - one_hot  # [BLOCK_S, BLOCK_E] exclusive count
    position = tl.sum((within + ahead[None, :]) * one_hot, axis=1)  # [BLOCK_S]
    kept = (tl.sum(one_hot, axis=1) > 0) & (position < capacity)

    # Every group's kept counts: each expert's total, the ones in groups before this one, and the
    # not-kept tokens of groups before this one.
    expert_total = tl.zeros([BLOCK_E], dtype=tl.int64)
    before = tl.zeros([BLOCK_E], dtype=tl.int64)
    not_kept_before = tl.zeros([BLOCK_G], dtype=tl.int64)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        counts = tl.load(kept_total_ptr + gs[:, None] * E + cols[None, :],
                         mask=(gs < G)[:, None] & (cols < E)[None, :], other=0).to(tl.int64)  # [BLOCK_G, BLOCK_E]
        earlier = (gs < group)[:, None]
        expert_total += tl.sum(counts, axis=0)
        before += tl.sum(tl.where(earlier, counts, 0), axis=0)
        not_kept_before += tl.where(gs < group, S - tl.sum(counts, axis=1), 0)
    expert_start = tl.cumsum(expert_total, axis=0) - expert_total  # [BLOCK_E]
    total_kept = tl.sum(expert_total, axis=0)
    kept_row = tl.sum(one_hot * (expert_start + before)[None, :], axis=1) + position
    not_kept = (in_group & ~kept).to(tl.int32)
    tail_row = (total_kept + tl.sum(not_kept_before, axis=0) + tl.load(dropped_ahead_ptr + chunk_index)
                + tl.cumsum(not_kept, axis=0) - not_kept)
    row = tl.where(kept, kept_row, tail_row).to(tl.int64)
    position_in_batch = group * S + token
    tl.store(slot_ptr + position_in_batch, tl.where(kept, position, -1).to(tl.int64), mask=in_group)
    tl.store(row_of_token_ptr + position_in_batch, row, mask=in_group)
    tl.store(token_of_row_ptr + row, position_in_batch, mask=in_group)

    modality = tl.load(modality_ptr + position_in_batch, mask=in_group, other=-1)
    for m in tl.static_range(M):
        chosen = one_hot * (kept & (modality == m)).to(tl.int32)[:, None]
        tl.atomic_add(kept_ptr + m * E + cols, tl.sum(chosen, axis=0).to(tl.float32), mask=cols < E)
    if (group == 0) & (chunk == 0):
        tl.store(segment_start_ptr + cols, expert_start, mask=cols < E)
        tl.store(segment_count_ptr + cols, expert_total, mask=cols < E)
        tl.store(segment_start_ptr + E, total_kept)
        tl.store(segment_count_ptr + E, G * S - total_kept)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _check_slot_inputs(expert: Tensor, gate: Tensor, modality: Tensor, num_experts: int, capacity: int) -> None:
    if expert.dim() != 2:
        raise ValueError(f"assign_slots: expert must be [G, S], got {list(expert.shape)}")
    check_index("assign_slots", "expert", expert, tuple(expert.shape))
    check_index("assign_slots", "modality", modality, tuple(expert.shape))
    if gate.shape != expert.shape:
        raise ValueError(f"assign_slots: gate {list(gate.shape)} must match expert {list(expert.shape)}")
    check_float("assign_slots", "gate", gate)
    if num_experts < 1 or capacity < 0:
        raise ValueError(f"assign_slots: need num_experts ≥ 1 and capacity ≥ 0, got {num_experts}, {capacity}")
    check_device("assign_slots", expert, gate, modality)


def _blocks(num_experts: int, size: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_E): chunks of up to 4096 one-hot entries, at least 16 tokens."""
    block_e = triton.next_power_of_2(num_experts)
    return min(triton.next_power_of_2(max(size, 1)), max(16, 4096 // block_e)), block_e


def plan_slots(expert: Tensor, gate: Tensor, modality: Tensor, num_experts: int, capacity: int,
               batch_priority: bool, num_modalities: int) -> SlotPlan:
    """Sort by priority (BPR only), count per group, then assign every token's slot and row."""
    _check_slot_inputs(expert, gate, modality, num_experts, capacity)
    expert, modality = expert.contiguous(), modality.contiguous()
    groups, size = expert.shape
    tokens, M = groups * size, num_modalities
    device = expert.device
    index = dict(dtype=torch.int64, device=device)
    slot = torch.empty_like(expert)  # [G, S]
    row_of_token = torch.empty(tokens, **index)
    token_of_row = torch.empty(tokens, **index)
    segment_start = torch.empty(num_experts + 1, **index)
    segment_count = torch.empty(num_experts + 1, **index)
    kept = torch.empty(M, num_experts, dtype=torch.float32, device=device)
    if tokens == 0:
        return SlotPlan(slot, row_of_token, token_of_row, segment_start.zero_(), segment_count.zero_(), kept.zero_())
    # Vanilla order is position order: the kernels then ignore `order` (any pointer will do).
    order = _priority_order(gate, True) if batch_priority else expert
    block_s, block_e = _blocks(num_experts, size)
    chunks = triton.cdiv(size, block_s)
    ahead = torch.empty(groups, chunks, num_experts, dtype=torch.int32, device=device)  # [G, chunks, E]
    dropped_ahead = torch.empty(groups, chunks, dtype=torch.int32, device=device)  # [G, chunks]
    kept_total = torch.empty(groups, num_experts, dtype=torch.int32, device=device)  # [G, E]
    meta = dict(HAS_ORDER=batch_priority, BLOCK_S=block_s, BLOCK_E=block_e)
    _group_counts_kernel[(groups,)](expert, order, ahead, dropped_ahead, kept_total, kept, size, num_experts,
                                    capacity, chunks, M * num_experts,
                                    BLOCK_ME=triton.next_power_of_2(M * num_experts), **meta)
    _slots_kernel[(groups, chunks)](
        expert, order, modality, ahead, dropped_ahead, kept_total,
        slot, row_of_token, token_of_row, segment_start, segment_count, kept,
        groups, size, num_experts, capacity, M=M, BLOCK_G=min(64, triton.next_power_of_2(groups)), **meta,
    )
    return SlotPlan(slot, row_of_token, token_of_row, segment_start, segment_count, kept)


# ---------------------------------------------------------------------------------------------
# Op (indices only: no autograd)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("limoe_kernels::assign_slots", mutates_args=())
def _assign_slots(expert: Tensor, gate: Tensor, modality: Tensor, num_experts: int, capacity: int,
                  batch_priority: bool, num_modalities: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(plan_slots(expert, gate, modality, num_experts, capacity, batch_priority, num_modalities))


def fake_plan(expert: Tensor, num_experts: int, num_modalities: int) -> SlotPlan:
    """Empty tensors with the plan's shapes and dtypes."""
    tokens = expert.numel()
    return SlotPlan(
        torch.empty_like(expert), expert.new_empty(tokens), expert.new_empty(tokens),
        expert.new_empty(num_experts + 1), expert.new_empty(num_experts + 1),
        expert.new_empty(num_modalities, num_experts, dtype=torch.float32),
    )


@_assign_slots.register_fake
def _(expert, gate, modality, num_experts, capacity, batch_priority, num_modalities):
    return tuple(fake_plan(expert, num_experts, num_modalities))


def assign_slots(expert: Tensor, gate: Tensor, modality: Tensor, num_experts: int, capacity: int,
                 batch_priority: bool, num_modalities: int = 1) -> SlotPlan:
    """Triton: expert [G, S] int64 (−1 = padding), gate [G, S], modality [G, S] → SlotPlan."""
    return SlotPlan(*_assign_slots(expert, gate, modality, num_experts, capacity, batch_priority, num_modalities))
