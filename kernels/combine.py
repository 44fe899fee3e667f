"""Combine: read each kept token's expert output back and scale it by its gate.

Math: y[t] = gate[t] · buf[row[t]] for row[t] ≥ 0, else 0 (a dropped token gets nothing from the
MoE layer and carries on through the residual).
Backward: dbuf[row[t]] = gate[t] · dy[t];  dgate[t] = ⟨dy[t], buf[row[t]]⟩.

The Triton forward gathers through `row` and scales in fp32. The backward walks buffer rows
instead, through the inverse map token_of_row (row → token, −1 = empty slot): each buffer row is
written once (empty ones with zeros, so nothing is zero-filled first) and each kept token's dgate
is one dot product in that row's program, so there are no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_device, check_float, check_index
from .dispatch import invert_rows


def combine_reference(buf: Tensor, row: Tensor, gate: Tensor) -> Tensor:
    """Plain PyTorch: buf [R, d], row [T] int64 (−1 = dropped), gate [T] → y [T, d]."""
    kept = (row >= 0)[:, None]  # [T, 1]
    picked = buf.index_select(0, row.clamp(min=0))  # [T, d]
    return torch.where(kept, picked * gate[:, None].to(buf.dtype), 0.0)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _combine_fwd_kernel(buf_ptr, row_ptr, gate_ptr, y_ptr, T, d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """y[t, cols] = gate[t] · buf[row[t], cols] (0 where row[t] < 0); tile = BLOCK_T tokens × BLOCK_D columns."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    token_ok = tokens < T
    col_ok = (cols < d)[None, :]
    row = tl.load(row_ptr + tokens, mask=token_ok, other=-1)  # [BLOCK_T]
    gate = tl.load(gate_ptr + tokens, mask=token_ok, other=0.0).to(tl.float32)
    picked = tl.load(buf_ptr + row[:, None] * d + cols[None, :], mask=(row >= 0)[:, None] & col_ok, other=0.0)
    y = picked.to(tl.float32) * gate[:, None]
    tl.store(y_ptr + tokens.to(tl.int64)[:, None] * d + cols[None, :], y, mask=token_ok[:, None] & col_ok)


@triton.jit
def _combine_bwd_kernel(
    buf_ptr, token_of_row_ptr, gate_ptr, dy_ptr, dbuf_ptr, dgate_ptr, R, d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per buffer row r with token t: dbuf[r] = gate[t] · dy[t] (0 if empty), dgate[t] = ⟨dy[t], buf[r]⟩."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_ok = rows < R
    token = tl.load(token_of_row_ptr + rows, mask=row_ok, other=-1)  # [BLOCK_R]
    filled = token >= 0
    gate = tl.load(gate_ptr + token, mask=filled, other=0.0).to(tl.float32)
    dgate = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = (cols < d)[None, :]
        row_offs = rows.to(tl.int64)[:, None] * d + cols[None, :]
        dy = tl.load(dy_ptr + token[:, None] * d + cols[None, :], mask=filled[:, None] & col_ok, other=0.0)
        dy = dy.to(tl.float32)
        picked = tl.load(buf_ptr + row_offs, mask=filled[:, None] & col_ok, other=0.0).to(tl.float32)
        tl.store(dbuf_ptr + row_offs, dy * gate[:, None], mask=row_ok[:, None] & col_ok)
        dgate += tl.sum(dy * picked, axis=1)
    tl.store(dgate_ptr + token, dgate, mask=filled)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    """Columns per tile: up to 256, with 8 tokens (forward) or 4 rows (backward) per tile; bigger
    2-D tiles of 64-bit addresses cost registers on sm_90 without moving more bytes."""
    return min(triton.next_power_of_2(max(d, 1)), 256)


def _check_combine_inputs(buf: Tensor, row: Tensor, gate: Tensor) -> None:
    if buf.dim() != 2:
        raise ValueError(f"combine: buf must be [R, d], got {list(buf.shape)}")
    check_float("combine", "buf", buf)
    if row.dim() != 1:
        raise ValueError(f"combine: row must be [T], got {list(row.shape)}")
    check_index("combine", "row", row, (row.shape[0],))
    if gate.shape != row.shape:
        raise ValueError(f"combine: gate {list(gate.shape)} must match row {list(row.shape)}")
    check_float("combine", "gate", gate)
    check_device("combine", buf, row, gate)


def _combine_forward(buf: Tensor, row: Tensor, gate: Tensor) -> Tensor:
    """Launch the forward gather-and-scale → y [T, d] in buf's dtype."""
    _check_combine_inputs(buf, row, gate)
    tokens, d = row.shape[0], buf.shape[1]
    y = buf.new_empty(tokens, d)  # [T, d]
    block_d = _block_d(d)
    if tokens and d:
        _combine_fwd_kernel[(triton.cdiv(tokens, 8), triton.cdiv(d, block_d))](
            buf.contiguous(), row.contiguous(), gate.contiguous(), y, tokens, d, BLOCK_T=8, BLOCK_D=block_d
        )
    return y


def _combine_backward(buf: Tensor, row: Tensor, gate: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """Launch the row-wise backward → dbuf [R, d] in buf's dtype, dgate [T] in gate's dtype."""
    num_rows, d = buf.shape
    token_of_row = invert_rows(row.contiguous(), num_rows)  # [R]
    dbuf = torch.empty_like(buf)  # [R, d]
    dgate = torch.zeros_like(gate)  # [T]; dropped tokens keep 0
    if num_rows and d:
        _combine_bwd_kernel[(triton.cdiv(num_rows, 4),)](
            buf.contiguous(), token_of_row, gate.contiguous(), dy.contiguous(), dbuf, dgate, num_rows, d,
            BLOCK_R=4, BLOCK_D=_block_d(d),
        )
    return dbuf, dgate


# ---------------------------------------------------------------------------------------------
# Autograd op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("limoe_kernels::combine", mutates_args=())
def combine(buf: Tensor, row: Tensor, gate: Tensor) -> Tensor:
    """Triton: buf [R, d], row [T] int64 (−1 = dropped, rows unique), gate [T] → y [T, d]."""
    return _combine_forward(buf, row, gate)


@combine.register_fake
def _(buf: Tensor, row: Tensor, gate: Tensor) -> Tensor:
    return buf.new_empty(row.shape[0], buf.shape[1])


@torch.library.custom_op("limoe_kernels::combine_backward", mutates_args=())
def _combine_backward_op(buf: Tensor, row: Tensor, gate: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """The backward kernel as an op of its own, so torch.compile can trace the backward graph."""
    return _combine_backward(buf, row, gate, dy)


@_combine_backward_op.register_fake
def _(buf: Tensor, row: Tensor, gate: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(buf), torch.empty_like(gate)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: Tensor) -> tuple[Tensor, None, Tensor]:
    buf, row, gate = ctx.saved_tensors
    dbuf, dgate = _combine_backward_op(buf, row, gate, dy)
    return dbuf, None, dgate


combine.register_autograd(_backward, setup_context=_setup_context)
