"""Fused bias+GELU expert FFN against the two-baddbmm reference: output and all five gradients."""

from __future__ import annotations

import pytest
import torch

from limoe_kernels.expert_ffn import expert_ffn, expert_ffn_reference

# The kernels add the bias after the GEMM and may get a different cuBLAS algorithm than baddbmm:
# same math, other rounding, so a little more room than assert_close's fp32 default.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _params(experts, slots, d, hidden, device):
    return [
        torch.randn(experts, slots, d, device=device),
        torch.randn(experts, d, hidden, device=device) / d**0.5,
        torch.randn(experts, hidden, device=device),
        torch.randn(experts, hidden, d, device=device) / hidden**0.5,
        torch.randn(experts, d, device=device),
    ]


@pytest.mark.parametrize("experts, slots, d, hidden", [(3, 37, 24, 150), (1, 5, 8, 16), (2, 0, 8, 16)])
def test_matches_reference(device, with_grads, experts, slots, d, hidden):
    params = _params(experts, slots, d, hidden, device)
    dout = torch.randn(experts, slots, d, device=device)
    (out,), grads = with_grads(expert_ffn, params, [dout])
    (out_ref,), grads_ref = with_grads(expert_ffn_reference, params, [dout])
    torch.testing.assert_close(out, out_ref, **TOLERANCE)
    for name, grad, grad_ref in zip(["buf", "w_in", "b_in", "w_out", "b_out"], grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, **TOLERANCE, msg=lambda m, name=name: f"d{name}: {m}")


def test_rejects_mismatched_weights(device):
    params = _params(2, 4, 8, 16, device)
    params[3] = params[3][:, :8]  # w_out [E, 8, d] instead of [E, h, d]
    with pytest.raises(ValueError, match="w_out"):
        expert_ffn(*params)
