"""Triton dispatch and combine against the reference, values and gradients."""

from __future__ import annotations

import pytest
import torch

from limoe_kernels.combine import combine, combine_reference
from limoe_kernels.dispatch import dispatch, dispatch_reference


def _rows(tokens, num_rows, drop_fraction, device):
    """Unique rows for kept tokens, −1 for dropped ones: what slot assignment produces."""
    row = torch.randperm(num_rows, device=device)[:tokens]
    return torch.where(torch.rand(tokens, device=device) < drop_fraction, -1, row)


CASES = [
    (300, 70, 400, 0.3),  # tokens and d not multiples of the tiles
    (33, 300, 40, 0.0),  # d > 256: several column tiles / loop steps; nothing dropped
    (20, 8, 64, 1.0),  # everything dropped: buffer all zeros, no gradient
    (1, 5, 3, 0.0),
]


@pytest.mark.parametrize("tokens, d, num_rows, drop", CASES)
def test_dispatch_matches_reference(device, with_grads, tokens, d, num_rows, drop):
    x = torch.randn(tokens, d, device=device)
    row = _rows(tokens, num_rows, drop, device)
    dbuf = torch.randn(num_rows, d, device=device)
    (buf,), (dx,) = with_grads(lambda x: dispatch(x, row, num_rows), [x], [dbuf])
    (buf_ref,), (dx_ref,) = with_grads(lambda x: dispatch_reference(x, row, num_rows), [x], [dbuf])
    assert torch.equal(buf, buf_ref)
    assert torch.equal(dx, dx_ref)


@pytest.mark.parametrize("tokens, d, num_rows, drop", CASES)
def test_combine_matches_reference(device, with_grads, tokens, d, num_rows, drop):
    buf = torch.randn(num_rows, d, device=device)
    row = _rows(tokens, num_rows, drop, device)
    gate = torch.rand(tokens, device=device)
    dy = torch.randn(tokens, d, device=device)
    (y,), grads = with_grads(lambda b, g: combine(b, row, g), [buf, gate], [dy])
    (y_ref,), grads_ref = with_grads(lambda b, g: combine_reference(b, row, g), [buf, gate], [dy])
    torch.testing.assert_close(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize(
    "op, args, message",
    [
        (dispatch, (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int32), 8), "int64"),
        (dispatch, (torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64), 8), "row must have shape"),
        (dispatch, (torch.zeros(4), torch.zeros(4, dtype=torch.int64), 8), "x must be"),
        (combine, (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), torch.zeros(5)), "gate"),
        (combine, (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), torch.zeros(4)), "buf"),
    ],
)
def test_rejects_bad_inputs(op, args, message):
    with pytest.raises(ValueError, match=message):
        op(*args)
