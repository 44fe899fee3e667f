"""Dispatch: copy each kept token into its row of the expert-major buffer.

Math: buf[row[t]] = x[t] for every token with row[t] ≥ 0; rows nobody fills stay zero.
Backward: dx[t] = dbuf[row[t]] (zero for dropped tokens). Rows are unique, so no atomics.

The Triton path writes both directions as a row gather, out[i] = src[index[i]] (zero where
index[i] < 0), so every output row is written exactly once and nothing is zero-filled first.
The forward gathers through the inverse map token_of_row (row → token, −1 = empty slot), which a
small scatter kernel builds from `row`; the backward gathers through `row` itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_device, check_float, check_index


def expert_major_rows(expert: Tensor, slot: Tensor, capacity: int) -> Tensor:
    """The buffer row of each token: expert [G, S], slot [G, S] (−1 = dropped) → row [G·S] int64.

    Row = (expert, group, slot) in expert-major order, so each expert's G·C slots are contiguous:
    the expert FFN is one batched matmul over [E, G·C, d], and the expert-parallel exchange splits
    the buffer by rank. Dropped and padding tokens (slot −1) get row −1.
    """
    groups = expert.shape[0]
    group_index = torch.arange(groups, device=expert.device)[:, None]  # [G, 1]
    row = expert * (groups * capacity) + group_index * capacity + slot
    return torch.where(slot >= 0, row, -1).view(-1)


def dispatch_reference(x: Tensor, row: Tensor, num_rows: int) -> Tensor:
    """Plain PyTorch: x [T, d], row [T] int64 (−1 = dropped) → buf [num_rows, d].

    Every token is copied, the dropped ones into a spare last row that is cut off, so no shape
    depends on how many were kept and torch.compile traces one graph for every batch."""
    rows = torch.where(row >= 0, row, num_rows)  # [T]
    return x.new_zeros(num_rows + 1, x.shape[1]).index_copy(0, rows, x)[:num_rows]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _invert_rows_kernel(row_ptr, token_of_row_ptr, T, BLOCK: tl.constexpr):
    """token_of_row[row[t]] = t for kept tokens (the buffer starts at −1)."""
    token = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    in_range = token < T
    row = tl.load(row_ptr + token, mask=in_range, other=-1)
    tl.store(token_of_row_ptr + row, token.to(tl.int64), mask=in_range & (row >= 0))


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, out_ptr, n_out, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[i, cols] = src[index[i], cols], or 0 where index[i] < 0; tile = BLOCK_R rows × BLOCK_D columns."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < n_out
    col_ok = (cols < d)[None, :]
    index = tl.load(index_ptr + rows, mask=row_ok, other=-1)  # [BLOCK_R]
    values = tl.load(src_ptr + index[:, None] * d + cols[None, :], mask=(index >= 0)[:, None] & col_ok, other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :], values, mask=row_ok[:, None] & col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def invert_rows(row: Tensor, num_rows: int) -> Tensor:
    """row [T] int64 (unique where ≥ 0) → token_of_row [num_rows] int64 (−1 = no token there)."""
    token_of_row = row.new_full((num_rows,), -1)  # [R]
    if row.shape[0]:
        _invert_rows_kernel[(triton.cdiv(row.shape[0], 1024),)](row, token_of_row, row.shape[0], BLOCK=1024)
    return token_of_row


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """src [N, d], index [M] int64 (−1 = zero row) → out [M, d] with out[i] = src[index[i]]."""
    n_out, d = index.shape[0], src.shape[1]
    out = src.new_empty(n_out, d)  # [M, d]
    block_d = min(triton.next_power_of_2(max(d, 1)), 256)
    grid = (triton.cdiv(n_out, 8), triton.cdiv(d, block_d))
    if n_out and d:
        _gather_rows_kernel[grid](src.contiguous(), index, out, n_out, d, BLOCK_R=8, BLOCK_D=block_d)
    return out


def _check_dispatch_inputs(x: Tensor, row: Tensor, num_rows: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"dispatch: x must be [T, d], got {list(x.shape)}")
    check_float("dispatch", "x", x)
    check_index("dispatch", "row", row, (x.shape[0],))
    if num_rows < 0:
        raise ValueError(f"dispatch: num_rows must be ≥ 0, got {num_rows}")
    check_device("dispatch", x, row)


# ---------------------------------------------------------------------------------------------
# Autograd op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("limoe_kernels::dispatch", mutates_args=())
def dispatch(x: Tensor, row: Tensor, num_rows: int) -> Tensor:
    """Triton: x [T, d], row [T] int64 (−1 = dropped, rows unique) → buf [num_rows, d]."""
    _check_dispatch_inputs(x, row, num_rows)
    row = row.contiguous()
    return gather_rows(x, invert_rows(row, num_rows))


@dispatch.register_fake
def _(x: Tensor, row: Tensor, num_rows: int) -> Tensor:
    return x.new_empty(num_rows, x.shape[1])


@torch.library.custom_op("limoe_kernels::dispatch_backward", mutates_args=())
def _dispatch_backward(dbuf: Tensor, row: Tensor) -> Tensor:
    """dx [T, d] = dbuf[row] (zero where row < 0): the same gather, through `row`."""
    return gather_rows(dbuf, row.contiguous())


@_dispatch_backward.register_fake
def _(dbuf: Tensor, row: Tensor) -> Tensor:
    return dbuf.new_empty(row.shape[0], dbuf.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    _, row, _ = inputs
    ctx.save_for_backward(row)


def _backward(ctx, dbuf: Tensor) -> tuple[Tensor, None, None]:
    (row,) = ctx.saved_tensors
    return _dispatch_backward(dbuf, row), None, None


dispatch.register_autograd(_backward, setup_context=_setup_context)
