"""Routing worked by hand: capacity, top-1 gates, BPR versus first-come slot filling."""

import math

import pytest
import torch

from limoe_kernels import REFERENCE_OPS
from limoe.model.routing import Grouping, expert_capacity


@pytest.mark.parametrize(
    "tokens, experts, factor, expected",
    [(16, 4, 1.0, 4), (10, 4, 1.05, 4), (100, 8, 1.25, 16), (100, 8, 1.0, 16), (96, 8, 1.0, 12), (10, 4, None, 12),
     (1704, 8, 1.05, 224)],
)
def test_capacity_is_ceil_kSc_over_E_rounded_up_to_4(tokens, experts, factor, expected):
    assert expert_capacity(tokens, experts, factor) == expected


# One group of 8 tokens, 3 experts. Logits chosen so the softmax gates are easy to check.
LOGITS = torch.tensor(
    [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [1.0, 0.0, 0.0],
     [0.0, 0.0, 2.0], [0.5, 0.0, 0.0], [0.0, 3.0, 0.0], [4.0, 0.0, 0.0]]
)


def _gate(top: float) -> float:
    return math.exp(top) / (math.exp(top) + 2.0)


def _route(logits: torch.Tensor):
    """The reference router on these logits (tokens x = the logits, router weight = identity)."""
    return REFERENCE_OPS.top1_router(logits, torch.eye(logits.shape[1]))


def _slots(expert, gate, capacity, batch_priority):
    modality = torch.zeros_like(expert)
    return REFERENCE_OPS.assign_slots(expert, gate, modality, 3, capacity, batch_priority).slot


def test_router_picks_argmax_and_unrenormalized_gate():
    router = _route(LOGITS)
    assert router.expert.tolist() == [0, 1, 0, 0, 2, 0, 1, 0]
    expected = [_gate(v) for v in (2.0, 1.0, 3.0, 1.0, 2.0, 0.5, 3.0, 4.0)]
    torch.testing.assert_close(router.gate, torch.tensor(expected))
    torch.testing.assert_close(router.prob_sum.sum(), torch.tensor(8.0))  # each token's p sums to 1


def test_bpr_keeps_the_highest_gates_and_vanilla_the_earliest():
    router = _route(LOGITS)
    expert, gate = router.expert[None], router.gate[None]
    # Expert 0 is wanted by tokens 0, 2, 3, 5, 7 (gates by logit 2, 3, 1, 0.5, 4); capacity 2.
    bpr = _slots(expert, gate, 2, True)[0]
    assert bpr.tolist() == [-1, 1, 1, -1, 0, -1, 0, 0]  # token 7 (logit 4) then 2 (logit 3) win expert 0
    vanilla = _slots(expert, gate, 2, False)[0]
    assert vanilla.tolist() == [0, 0, 1, -1, 0, -1, 1, -1]  # tokens 0 and 2 came first


def test_ties_keep_position_order_and_padding_takes_no_slot():
    expert = torch.tensor([[1, -1, 1, 1, 1]])
    gate = torch.tensor([[0.5, 0.9, 0.5, 0.7, 0.5]])
    plan = REFERENCE_OPS.assign_slots(expert, gate, torch.where(expert < 0, -1, 0), 2, 3, True)
    assert plan.slot[0].tolist() == [1, -1, 2, 0, -1]
    # Rows: expert 1's kept tokens by slot (3, 0, 2), then the rest by priority (1: gate 0.9, then 4).
    assert plan.token_of_row.tolist() == [3, 0, 2, 1, 4]
    assert plan.segment_count.tolist() == [0, 3, 2]


def test_combine_weights_are_the_gates_of_kept_tokens():
    router = _route(LOGITS)
    slot = _slots(router.expert[None], router.gate[None], 2, True)[0]
    row = torch.where(slot >= 0, router.expert * 2 + slot, -1)
    buffer = torch.arange(1.0, 7.0)[:, None].repeat(1, 2)  # expert e slot s holds value 2e + s + 1
    y = REFERENCE_OPS.combine(buffer, row, router.gate)
    expected = torch.tensor([0.0, _gate(1.0) * 4, _gate(3.0) * 2, 0.0, _gate(2.0) * 5, 0.0, _gate(3.0) * 3, _gate(4.0)])
    torch.testing.assert_close(y[:, 0], expected)


def test_grouping_spreads_examples_evenly_and_round_trips():
    grouping = Grouping.for_batch(20, 8)
    assert (grouping.num_groups, grouping.per_group) == (3, 7)
    x = torch.randn(20, 5, 3)
    grouped = grouping.group(x, 0.0)
    assert grouped.shape == (3, 35, 3)
    torch.testing.assert_close(grouping.ungroup(grouped, 5), x)
    assert Grouping.for_batch(3, 8).num_groups == 1


def test_every_routing_field_says_how_micro_batches_merge():
    """A field added to LayerRouting without a merge rule would be dropped or mixed up silently."""
    from dataclasses import fields

    from limoe.model.routing import LayerRouting

    assert [f.name for f in fields(LayerRouting) if not callable(f.metadata.get("merge"))] == []


def test_merged_micro_batch_routing_is_the_whole_batch_routing():
    """Micro-batches of whole routing groups route as the whole batch does (no router noise), so their
    merged record must equal the record of the batch encoded at once: 6 examples in groups of 2,
    split 2 + 4, with capacity tight enough to drop tokens."""
    from limoe.config import load_model_config
    from limoe.model.routing import LayerRouting
    from limoe.model.tower import Limoe

    torch.manual_seed(0)
    config = load_model_config("limoe-tiny", ["moe.router_noise=false", "moe.group_size=2",
                                              "moe.train_capacity_factor=0.5"])
    model = Limoe(config).train()
    images = torch.randn(6, 3, config.image_size, config.image_size)  # [B, 3, H, W]
    tokens = torch.randint(1, config.vocab_size, (6, config.context_length))  # [B, L]
    tokens[1, 4:] = 0
    tokens[4, 6:] = 0
    with torch.no_grad():
        whole = model(images, tokens).routing
        micro = [model(images[rows], tokens[rows]).routing for rows in (slice(0, 2), slice(2, 6))]
    assert whole and any((layer.kept < layer.routed).any() for layer in whole)  # some tokens dropped
    for layer, records in zip(whole, zip(*micro)):
        merged = LayerRouting.merge(records)
        for name, expected in vars(layer).items():
            torch.testing.assert_close(getattr(merged, name), expected, msg=name)
