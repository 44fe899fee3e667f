"""Triton top-1 router (GEMM included) against the reference: choices, loss terms, statistics,
and dx, dW through each of them; the sums by hand."""

from __future__ import annotations

import math

import pytest
import torch

from limoe_kernels.router import DIFFERENTIABLE, RouterOutput, top1_router, top1_router_reference

TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # dW adds tile partials: other order than the reference's matmul


def _compare(x, w, noise, modality, group_size, num_modalities, only=None):
    """Every output equal to the reference; dx and dW with a random upstream gradient in every
    differentiable output (or in `only` that one)."""
    args = (noise, modality, group_size, num_modalities)
    shapes = top1_router_reference(x, w, *args)
    upstream = [torch.randn_like(getattr(shapes, name)) if only in (None, name) else None for name in DIFFERENTIABLE]
    results = []
    for router in (top1_router, top1_router_reference):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        out = router(*leaves, *args)
        pairs = [(getattr(out, name), up) for name, up in zip(DIFFERENTIABLE, upstream) if up is not None]
        torch.autograd.backward([value for value, _ in pairs], [up for _, up in pairs])
        results.append((out, [leaf.grad for leaf in leaves]))
    (got, grads), (reference, grads_ref) = results
    for name in RouterOutput._fields:
        value, expected = getattr(got, name), getattr(reference, name)
        if value.dtype in (torch.int64, torch.bool):
            assert torch.equal(value, expected), name
        else:
            assert value.dtype == torch.float32, name
            torch.testing.assert_close(value, expected, msg=name)
    for name, grad, grad_ref in zip(["dx", "dw"], grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, **TOLERANCE, msg=name)


@pytest.mark.parametrize("tokens, group_size", [(1, 1), (300, 300), (300, 60), (45, 5)])  # 300: no block multiple
@pytest.mark.parametrize("num_experts", [1, 7, 33])  # 33: padded to a 64-wide tile
@pytest.mark.parametrize("noisy", [False, True])
def test_matches_reference(device, tokens, group_size, num_experts, noisy):
    d = 70  # two GEMM steps, the second partial
    x = torch.randn(tokens, d, device=device)
    w = torch.randn(num_experts, d, device=device) / d**0.5
    noise = torch.randn(tokens, num_experts, device=device) / num_experts if noisy else None
    modality = torch.randint(-1, 2, (tokens,), device=device)  # image, text and padding mixed
    _compare(x, w, noise, modality, group_size, 2)


@pytest.mark.parametrize("only", DIFFERENTIABLE)
def test_each_gradient_path_alone(device, only):
    """dx and dW through one output at a time, so no term can hide behind another."""
    x = torch.randn(96, 20, device=device)
    w = torch.randn(6, 20, device=device) / 4
    noise = torch.randn(96, 6, device=device) / 6
    modality = torch.randint(-1, 2, (96,), device=device)
    _compare(x, w, noise, modality, 24, 2, only=only)


def test_fp16_tokens_use_the_rounded_router_weight(device):
    """The GEMM runs in the tokens' dtype: fp32 master weights are rounded to it first."""
    x = torch.randn(64, 32, device=device).half()
    w = torch.randn(4, 32, device=device) / 6
    modality = torch.zeros(64, dtype=torch.int64, device=device)
    got, want = top1_router(x, w, None, modality, 16), top1_router_reference(x, w, None, modality, 16)
    assert torch.equal(got.expert, want.expert)
    torch.testing.assert_close(got.gate, want.gate)


def test_a_group_without_text_has_no_text_terms(device):
    x = torch.randn(40, 8, device=device)
    w = torch.randn(4, 8, device=device)
    modality = torch.ones(40, dtype=torch.int64, device=device)
    modality[:20] = 0  # group 0 is all image
    out = top1_router(x, w, None, modality, 20, 2)
    assert out.present.tolist() == [[True, False], [False, True]]
    assert out.token_entropy[0, 1] == 0 and out.marginal_entropy[0, 1] == 0
    _compare(x, w, None, modality, 20, 2)


def test_sums_by_hand(device):
    """A zero router: p = ½ each, H = log 2, logsumexp = log 2, and without noise the winner
    (expert 0, the lower index) leaves u = 0 for both, so each load term is Φ(0) = ½: balanced,
    no importance or load loss. The padding token gets expert −1, gate 0 and is in no sum."""
    x = torch.randn(3, 4, device=device)
    w = torch.zeros(2, 4, device=device)
    modality = torch.tensor([0, 1, -1], device=device)
    out = top1_router(x, w, None, modality, 3, 2)
    assert out.expert.tolist() == [0, 0, -1]
    torch.testing.assert_close(out.gate.cpu(), torch.tensor([0.5, 0.5, 0.0]))
    assert out.importance.item() == 0 and out.load.item() == 0
    torch.testing.assert_close(out.z.cpu(), torch.tensor(math.log(2) ** 2))
    torch.testing.assert_close(out.token_entropy.cpu(), torch.full((1, 2), math.log(2)))
    torch.testing.assert_close(out.marginal_entropy.cpu(), torch.full((1, 2), math.log(2)))
    assert out.routed.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    torch.testing.assert_close(out.prob_sum.cpu(), torch.full((2, 2), 0.5))


def test_ties_pick_lowest_expert(device):
    logits = torch.zeros(5, 6, device=device)
    logits[1, [2, 4]] = 3.0
    logits[2, [5, 0]] = 1.0
    out = top1_router(logits, torch.eye(6, device=device))  # x·Iᵀ: the logits themselves
    assert out.expert.tolist() == [0, 2, 0, 0, 0]
    torch.testing.assert_close(out.gate[0], torch.tensor(1 / 6, device=device))


def test_noise_changes_choice_not_probabilities(device):
    x = torch.tensor([[1.0, 0.0, 0.0]], device=device)
    noise = torch.tensor([[0.0, 2.0, 0.0]], device=device)
    out = top1_router(x, torch.eye(3, device=device), noise)
    assert out.expert.item() == 1
    torch.testing.assert_close(out.gate, torch.softmax(x + noise, -1)[:, 1])
    torch.testing.assert_close(out.prob_sum, torch.softmax(x, -1))


@pytest.mark.parametrize(
    "x, w, noise, modality, group_size, message",
    [
        (torch.zeros(4), torch.zeros(3, 4), None, None, None, "x must be"),
        (torch.zeros(4, 5), torch.zeros(3, 4), None, None, None, "w \\[E, d\\]"),
        (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(2, 3), None, None, None, "x must be float32"),
        (torch.zeros(4, 3), torch.zeros(2, 3), torch.zeros(4, 3), None, None, "noise"),
        (torch.zeros(4, 3), torch.zeros(2, 3), None, torch.zeros(4, dtype=torch.int32), None, "modality must be int64"),
        (torch.zeros(4, 3), torch.zeros(2, 3), None, None, 3, "groups of 3"),
    ],
)
def test_rejects_bad_inputs(x, w, noise, modality, group_size, message):
    with pytest.raises(ValueError, match=message):
        top1_router(x, w, noise, modality, group_size)
