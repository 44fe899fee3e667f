"""Triton top-1 router against the reference: probs, expert, gate, the per-(group, modality) sums
and d logits through each of them; the sums by hand."""

from __future__ import annotations

import math

import pytest
import torch

from limoe_kernels.router import RouterOutput, top1_router, top1_router_reference

FLOAT_OUTPUTS = [name for name in RouterOutput._fields if name != "expert"]


def _upstream(outputs: RouterOutput, only: str | None) -> list:
    """A random upstream gradient for every float output (or for `only` that one)."""
    return [
        None if name == "expert" or (only and name != only) else torch.randn_like(value)
        for name, value in zip(RouterOutput._fields, outputs)
    ]


def _compare(with_grads, logits, noise, modality, group_size, num_modalities, only=None):
    args = (noise, modality, group_size, num_modalities)
    upstream = _upstream(top1_router_reference(logits, *args), only)
    got, (dlogits,) = with_grads(lambda x: top1_router(x, *args), [logits], upstream)
    want, (dlogits_ref,) = with_grads(lambda x: top1_router_reference(x, *args), [logits], upstream)
    assert torch.equal(got.expert, want.expert)
    for name in FLOAT_OUTPUTS:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
        assert getattr(got, name).dtype == torch.float32
    torch.testing.assert_close(dlogits, dlogits_ref)


@pytest.mark.parametrize("tokens, group_size", [(1, 1), (300, 300), (300, 60), (300, 5)])  # 300: no block multiple
@pytest.mark.parametrize("num_experts", [1, 7, 33])  # 33: padded to a 64-wide tile
@pytest.mark.parametrize("noisy", [False, True])
def test_matches_reference(device, with_grads, tokens, group_size, num_experts, noisy):
    logits = torch.randn(tokens, num_experts, device=device)
    noise = torch.randn(tokens, num_experts, device=device) / num_experts if noisy else None
    modality = torch.randint(-1, 2, (tokens,), device=device)  # image, text and padding mixed
    _compare(with_grads, logits, noise, modality, group_size, 2)


@pytest.mark.parametrize("only", FLOAT_OUTPUTS)
def test_each_gradient_path_alone(device, with_grads, only):
    """d logits through one output at a time, so no term can hide behind another."""
    logits = torch.randn(96, 6, device=device)
    noise = torch.randn(96, 6, device=device) / 6
    modality = torch.randint(-1, 2, (96,), device=device)
    _compare(with_grads, logits, noise, modality, 24, 2, only=only)


def test_a_group_without_text_has_zero_text_sums(device, with_grads):
    logits = torch.randn(40, 4, device=device)
    modality = torch.ones(40, dtype=torch.int64, device=device)
    modality[:20] = 0  # group 0 is all image
    out = top1_router(logits, None, modality, 20, 2)
    assert out.prob_sum[0, 1].abs().sum() == 0 and out.entropy_sum[0, 1] == 0 and out.z_sum[0, 1] == 0
    _compare(with_grads, logits, None, modality, 20, 2)


def test_sums_by_hand(device):
    """Two equal logits: p = ½ each, H = log 2, logsumexp = log 2, and without noise the winner
    (expert 0, the lower index) leaves u = 0 for both, so each load term is Φ(0) = ½. The padding
    token gets expert −1, gate 0 and is in no sum."""
    logits = torch.zeros(3, 2, device=device)
    modality = torch.tensor([0, 1, -1], device=device)
    out = top1_router(logits, None, modality, 3, 2)
    assert out.expert.tolist() == [0, 0, -1]  # the padding token is not routed
    torch.testing.assert_close(out.gate.cpu(), torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(out.prob_sum.cpu(), torch.full((1, 2, 2), 0.5))
    torch.testing.assert_close(out.load_sum.cpu(), torch.full((1, 2, 2), 0.5))
    torch.testing.assert_close(out.entropy_sum.cpu(), torch.full((1, 2), math.log(2)))
    torch.testing.assert_close(out.z_sum.cpu(), torch.full((1, 2), math.log(2) ** 2))


def test_ties_pick_lowest_expert(device):
    logits = torch.zeros(5, 6, device=device)
    logits[1, [2, 4]] = 3.0
    logits[2, [5, 0]] = 1.0
    out = top1_router(logits)
    assert out.expert.tolist() == [0, 2, 0, 0, 0]
    torch.testing.assert_close(out.gate[0], torch.tensor(1 / 6, device=device))


def test_noise_changes_choice_not_probs(device):
    logits = torch.tensor([[1.0, 0.0, 0.0]], device=device)
    noise = torch.tensor([[0.0, 2.0, 0.0]], device=device)
    out = top1_router(logits, noise)
    torch.testing.assert_close(out.probs, torch.softmax(logits, -1))
    assert out.expert.item() == 1
    torch.testing.assert_close(out.gate, torch.softmax(logits + noise, -1)[:, 1])


@pytest.mark.parametrize(
    "logits, noise, modality, group_size, message",
    [
        (torch.zeros(4), None, None, None, "logits must be"),
        (torch.zeros(4, 3, dtype=torch.int64), None, None, None, "logits must be float32"),
        (torch.zeros(4, 3), torch.zeros(4, 2), None, None, "noise"),
        (torch.zeros(4, 3), None, torch.zeros(4, dtype=torch.int32), None, "modality must be int64"),
        (torch.zeros(4, 3), None, None, 3, "groups of 3"),
    ],
)
def test_rejects_bad_inputs(logits, noise, modality, group_size, message):
    with pytest.raises(ValueError, match=message):
        top1_router(logits, noise, modality, group_size)
