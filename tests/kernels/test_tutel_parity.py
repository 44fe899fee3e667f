"""Tutel's top-1 layer with batch-prioritized routing computes this layer's function.

Tutel is an optional peer (installed from its repository, not PyPI); this module is skipped
where it does not import. Where it does, the benchmark's `tutel` row is known to time the same
routing: top-1 over a softmax, the gate as combine weight, priority by gate value, capacity per
expert, dropped tokens zero. Tutel routes the whole batch as one group with capacity
int(c·ceil(T/E)), so the comparison uses one group and that capacity.
"""

import math

import pytest
import torch
import torch.nn.functional as F

tutel_moe = pytest.importorskip("tutel.moe", reason="tutel is not installed (optional peer)")


def _tutel_layer(d: int, hidden: int, num_experts: int, capacity_factor: float):
    return tutel_moe.moe_layer(
        gate_type={"type": "top", "k": 1, "capacity_factor": capacity_factor, "fp32_gate": True},
        model_dim=d,
        experts={"type": "ffn", "count_per_node": num_experts, "hidden_size_per_expert": hidden, "activation_fn": F.gelu},
        batch_prioritized_routing=True,
    )


def _tutel_parameters(layer) -> list[torch.Tensor]:
    """wg [E, d], fc1_w [E, h, d], fc1_bias [E, h], fc2_w [E, h, d], fc2_bias [E, d]."""
    experts = layer.experts
    return [layer.gates[0].wg.weight, experts.batched_fc1_w, experts.batched_fc1_bias,
            experts.batched_fc2_w, experts.batched_fc2_bias]


def _in_our_layout(wg, fc1_w, fc1_bias, fc2_w, fc2_bias) -> list[torch.Tensor]:
    """w_router [E, d], w_in [E, h, d], b_in [E, h], w_out [E, d, h], b_out [E, d] (Linear layout)."""
    return [wg, fc1_w, fc1_bias, fc2_w.transpose(1, 2), fc2_bias]


@pytest.mark.parametrize("tokens, capacity_factor", [(67, 1.0), (67, 0.5), (90, 1.25)])
def test_tutel_bpr_layer_equals_ours_with_gradients(device, ops_pair, moe_layer, tokens, capacity_factor):
    d, hidden, num_experts = 10, 14, 4
    tutel = _tutel_layer(d, hidden, num_experts, capacity_factor).to(device)
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    dy = torch.randn(tokens, d, device=device)
    capacity = int(capacity_factor * math.ceil(tokens / num_experts))

    expected = tutel(x)
    dx, *tutel_grads = torch.autograd.grad(expected, [x, *_tutel_parameters(tutel)], dy)
    expected_grads = [dx, *_in_our_layout(*tutel_grads)]
    assert (expected.abs().sum(-1) == 0).any()  # capacity binds: priority decides who is dropped
    for ops in ops_pair:
        weights = [w.detach().clone().requires_grad_() for w in _in_our_layout(*_tutel_parameters(tutel))]
        modality = torch.zeros(tokens, dtype=torch.int64, device=device)
        ours = moe_layer(ops, x, weights[0], weights[1:], None, modality, tokens, capacity)[0]
        torch.testing.assert_close(ours, expected)
        for got, want in zip(torch.autograd.grad(ours, [x, *weights], dy), expected_grads):
            torch.testing.assert_close(got, want)
