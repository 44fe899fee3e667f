"""Triton top-1 router against the reference: probs, expert, gate and d logits."""

from __future__ import annotations

import pytest
import torch

from kernels.router import top1_router, top1_router_reference


def _compare(logits, noise, with_grads, dprobs=None, dgate=None):
    tokens, num_experts = logits.shape
    dprobs = torch.randn(tokens, num_experts, device=logits.device) if dprobs is None else dprobs
    dgate = torch.randn(tokens, device=logits.device) if dgate is None else dgate
    upstream = (dprobs, None, dgate)
    (p, e, g), (dl,) = with_grads(lambda x: top1_router(x, noise), [logits], upstream)
    (p_ref, e_ref, g_ref), (dl_ref,) = with_grads(lambda x: top1_router_reference(x, noise), [logits], upstream)
    torch.testing.assert_close(p, p_ref)
    assert torch.equal(e, e_ref)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(dl, dl_ref)
    assert p.dtype == g.dtype == torch.float32 and e.dtype == torch.int64


@pytest.mark.parametrize("tokens", [1, 300])  # 300: not a multiple of any row block
@pytest.mark.parametrize("num_experts", [1, 7, 33])  # 33: padded to a 64-wide tile
@pytest.mark.parametrize("noisy", [False, True])
def test_matches_reference(device, with_grads, tokens, num_experts, noisy):
    logits = torch.randn(tokens, num_experts, device=device)
    noise = torch.randn(tokens, num_experts, device=device) / num_experts if noisy else None
    _compare(logits, noise, with_grads)


def test_gate_only_gradient(device, with_grads):
    """When only the gate is used (probs feed no loss), d logits comes from the noisy softmax alone."""
    logits = torch.randn(50, 8, device=device)
    noise = torch.randn(50, 8, device=device) / 8
    _compare(logits, noise, with_grads, dprobs=torch.zeros(50, 8, device=device))


def test_ties_pick_lowest_expert(device):
    logits = torch.zeros(5, 6, device=device)
    logits[1, [2, 4]] = 3.0
    logits[2, [5, 0]] = 1.0
    _, expert, gate = top1_router(logits)
    assert expert.tolist() == [0, 2, 0, 0, 0]
    torch.testing.assert_close(gate[0], torch.tensor(1 / 6, device=device))


def test_noise_changes_choice_not_probs(device):
    logits = torch.tensor([[1.0, 0.0, 0.0]], device=device)
    noise = torch.tensor([[0.0, 2.0, 0.0]], device=device)
    probs, expert, gate = top1_router(logits, noise)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert expert.item() == 1
    torch.testing.assert_close(gate, torch.softmax(logits + noise, -1)[:, 1])


@pytest.mark.parametrize(
    "logits, noise, message",
    [
        (torch.zeros(4), None, "logits must be"),
        (torch.zeros(4, 3, dtype=torch.int64), None, "logits must be float32"),
        (torch.zeros(4, 3), torch.zeros(4, 2), "noise"),
    ],
)
def test_rejects_bad_inputs(logits, noise, message):
    with pytest.raises(ValueError, match=message):
        top1_router(logits, noise)
