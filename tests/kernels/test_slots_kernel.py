"""Triton slot assignment and row order against the reference: exact equality, BPR and vanilla."""

from __future__ import annotations

import pytest
import torch

from limoe_kernels.slots import SlotPlan, assign_slots, assign_slots_reference


def _modality(expert: torch.Tensor) -> torch.Tensor:
    """Image and text mixed, padding where the expert is −1."""
    modality = torch.randint(0, 2, expert.shape, device=expert.device)
    return torch.where(expert < 0, -1, modality)


def _check(expert, gate, num_experts, capacity, modality=None) -> SlotPlan:
    """Both priority modes equal the reference in every field; returns the BPR plan."""
    modality = _modality(expert) if modality is None else modality
    plans = {}
    for batch_priority in (False, True):
        plans[batch_priority] = assign_slots(expert, gate, modality, num_experts, capacity, batch_priority, 2)
        expected = assign_slots_reference(expert, gate, modality, num_experts, capacity, batch_priority, 2)
        for name, got, want in zip(SlotPlan._fields, plans[batch_priority], expected):
            assert torch.equal(got, want), f"{name}, batch_priority={batch_priority}"
    return plans[True]


@pytest.mark.parametrize(
    "groups, size, num_experts, capacity",
    [
        (3, 300, 5, 40),  # size not a multiple of the chunk; some drops
        (2, 300, 33, 4),  # 64-wide expert tile, 64-token chunks: the cross-chunk scans matter
        (1, 257, 32, 3),  # capacity far below demand
        (4, 50, 3, 50),  # capacity above demand: nothing dropped
        (2, 77, 1, 20),  # one expert
        (70, 3, 4, 1),  # more groups than one block of the cross-group scan
        (1, 1, 4, 1),
    ],
)
def test_matches_reference(device, groups, size, num_experts, capacity):
    expert = torch.randint(0, num_experts, (groups, size), device=device)
    gate = torch.rand(groups, size, device=device)
    _check(expert, gate, num_experts, capacity)


def test_rows_are_expert_segments_then_the_tail(device):
    """Kept tokens sorted by (expert, group, slot), then the others; the permutations are inverse."""
    expert = torch.randint(-1, 4, (3, 100), device=device)
    plan = _check(expert, torch.rand(3, 100, device=device), 4, 9)
    tokens = torch.arange(300, device=device)
    assert torch.equal(plan.token_of_row[plan.row_of_token], tokens)
    kept = plan.slot.view(-1) >= 0
    rows = plan.row_of_token
    for e in range(4):
        mine = kept & (expert.view(-1) == e)
        start, count = plan.segment_start[e].item(), plan.segment_count[e].item()
        assert mine.sum() == count and torch.equal(rows[mine].sort().values, torch.arange(start, start + count, device=device))
    assert (rows[~kept] >= plan.segment_start[4]).all() and plan.segment_count.sum() == 300
    assert plan.kept.sum() == kept.sum()


def test_all_tokens_choose_one_expert(device):
    expert = torch.full((2, 130), 3, device=device)
    gate = torch.rand(2, 130, device=device)
    slot = _check(expert, gate, 8, 10).slot
    assert ((slot >= 0).sum(dim=1) == 10).all()
    kept_gates = torch.where(slot >= 0, gate, -1.0).topk(10, dim=1).values
    torch.testing.assert_close(kept_gates, gate.topk(10, dim=1).values)  # BPR keeps the highest gates


def test_zero_capacity_drops_everything(device):
    expert = torch.randint(0, 4, (2, 40), device=device)
    plan = _check(expert, torch.rand(2, 40, device=device), 4, 0)
    assert (plan.slot == -1).all() and plan.segment_count.tolist() == [0, 0, 0, 0, 80]


def test_padding_takes_no_slot(device):
    expert = torch.randint(0, 6, (3, 200), device=device)
    expert[:, 150:] = -1
    expert[1, ::3] = -1
    slot = _check(expert, torch.rand(3, 200, device=device), 6, 12).slot
    assert (slot[expert < 0] == -1).all()


def test_gate_ties_keep_position_order(device):
    """Few distinct gate values: BPR must break ties by position (a stable sort)."""
    expert = torch.randint(0, 3, (2, 300), device=device)
    gate = torch.randint(0, 3, (2, 300), device=device).float() / 4
    _check(expert, gate, 3, 30)
    same = torch.zeros(1, 9, dtype=torch.int64, device=device)
    plan = assign_slots(same, torch.ones(1, 9, device=device), same, 1, 4, True)
    assert plan.slot.tolist() == [[0, 1, 2, 3, -1, -1, -1, -1, -1]]
    assert plan.token_of_row.tolist() == list(range(9))


def test_empty_groups(device):
    expert = torch.zeros(0, 16, dtype=torch.int64, device=device)
    plan = assign_slots(expert, torch.zeros(0, 16, device=device), expert, 2, 3, True)
    assert plan.slot.shape == (0, 16) and plan.segment_count.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "expert, gate, capacity, message",
    [
        (torch.zeros(6, dtype=torch.int64), torch.zeros(6), 1, "expert must be"),
        (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3), 1, "int64"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2), 1, "gate"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), -1, "capacity"),
    ],
)
def test_rejects_bad_inputs(expert, gate, capacity, message):
    with pytest.raises(ValueError, match=message):
        assign_slots(expert, gate, torch.zeros(expert.shape, dtype=torch.int64), 4, capacity, True)
