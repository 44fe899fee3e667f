"""Grouped-GEMM expert FFN on the expert-major exchange buffer against the two-baddbmm reference:
output and all five gradients on the filled rows of every slab."""

from __future__ import annotations

import pytest
import torch

from limoe_kernels.expert_ffn import expert_ffn, expert_ffn_reference

# The kernels accumulate in another order than baddbmm: same math, other rounding.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _inputs(experts, sources, slab, d, hidden, device):
    """(params, counts, filled [E, N] bool): slab rows past each count are padding (zeros, as
    dispatch writes them) with a zero upstream gradient (as combine writes it)."""
    counts = torch.randint(0, slab + 1, (experts, sources), device=device)
    counts[0, 0] = slab  # one full slab: a tile ends exactly at the slab's end
    filled = (torch.arange(slab, device=device) < counts[..., None]).reshape(experts, sources * slab)
    params = [
        torch.randn(experts, sources * slab, d, device=device) * filled[..., None],
        torch.randn(experts, hidden, d, device=device) / d**0.5,
        torch.randn(experts, hidden, device=device),
        torch.randn(experts, d, hidden, device=device) / hidden**0.5,
        torch.randn(experts, d, device=device),
    ]
    return params, counts, filled


@pytest.mark.parametrize(
    "experts, sources, slab, d, hidden",
    [(3, 2, 37, 24, 150), (1, 1, 5, 8, 16), (2, 3, 0, 8, 16), (2, 2, 130, 70, 40)],  # 130 rows: two row tiles
)
def test_matches_reference_on_filled_rows(device, with_grads, experts, sources, slab, d, hidden):
    params, counts, filled = _inputs(experts, sources, slab, d, hidden, device)
    dout = torch.randn(experts, sources * slab, d, device=device) * filled[..., None]
    (out,), grads = with_grads(lambda b, *w: expert_ffn(b, counts, *w), params, [dout])
    (out_ref,), grads_ref = with_grads(lambda b, *w: expert_ffn_reference(b, counts, *w), params, [dout])
    torch.testing.assert_close(out[filled], out_ref[filled], **TOLERANCE)
    torch.testing.assert_close(grads[0][filled], grads_ref[0][filled], **TOLERANCE, msg="dbuf")
    for name, grad, grad_ref in zip(["w_in", "b_in", "w_out", "b_out"], grads[1:], grads_ref[1:]):
        torch.testing.assert_close(grad, grad_ref, **TOLERANCE, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize(
    "index, shape, message",
    [(3, (2, 16, 8), "w_out"), (1, (2, 16), "w_in"), (2, (3, 16), "b_in")],  # index into [buf, w_in, b_in, …]
)
def test_rejects_mismatched_weights(device, index, shape, message):
    params, counts, _ = _inputs(2, 1, 4, 8, 16, device)
    params[index] = torch.zeros(shape, device=device)
    with pytest.raises(ValueError, match=message):
        expert_ffn(params[0], counts, *params[1:])


def test_rejects_counts_that_do_not_split_the_rows(device):
    params, _, _ = _inputs(2, 1, 4, 8, 16, device)
    with pytest.raises(ValueError, match="counts must be"):
        expert_ffn(params[0], torch.zeros(2, 3, dtype=torch.int64, device=device), *params[1:])
