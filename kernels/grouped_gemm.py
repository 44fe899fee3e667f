"""Grouped GEMMs of the expert FFN: each expert multiplies only its own rows, with the gather of
token rows in the prologue and the bias, GELU, gate and scatter in the epilogue (the
ScatterMoE / SonicMoE pattern). This module holds the kernels and their launchers; the ops that
use them are `expert_ffn` (an expert-major row buffer, as expert parallelism exchanges it) and
`layer.moe_layer` (the whole layer, reading and writing token rows directly).

Rows are grouped in segments: segment s covers rows start[s] … start[s] + count[s] − 1 and
belongs to expert s // per_expert (one segment per expert in one process; one per expert and
source rank after the expert-parallel exchange). A segment past the experts' ones (the "tail" of
tokens no expert kept) gets no GEMM: the down projection writes zeros there and the input
gradient only the router's term. Tiles never straddle segments, and a launch has at most
cdiv(rows, BLOCK_M) + segments tiles, so the grid is static (no host sync) and no padded slot is
ever computed. Each program finds its segment from the counts (a cumulative sum over ≤ a few
hundred segments in registers).

Math, per kept row r of expert e, token t = index[r] (Linear layout: w_in [E, h, d], w_out [E, d, h]):
    up:            z[r] = x[t] · w_in[e]ᵀ + b_in[e],   act[r] = GELU(z[r]) = z·Φ(z)     (writes z and act)
    down:          y[t] = gate[t] · (act[r] · w_out[e]ᵀ + b_out[e])                  (0 for tokens not kept)
    down backward: g[r] = dy[t] · w_out[e],   dz[r] = gate[t] · g[r] · (Φ(z) + z·φ(z)),
                   dgate[t] = ⟨g[r], act[r]⟩ + ⟨dy[t], b_out[e]⟩   (per column tile, summed by the router)
    up backward:   dx[t] = dz[r] · w_in[e] + dℓ[t] · W_router        (the router's term fused in)
    weights:       dw_out[e] = Σ_r (gate·dy)[t]ᵀ act[r],  db_out[e] = Σ_r (gate·dy)[t],
                   dw_in[e]  = Σ_r dz[r]ᵀ x[t],           db_in[e]  = Σ_r dz[r]
Without an index (the expert-parallel buffer) rows are read and written in place and there is no
gate or router term. Operands load in their dtype (bf16 under autocast) and accumulate in fp32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import dot_precision


class Segments(NamedTuple):
    """Row segments of a grouped GEMM: segment s = rows start[s] … start[s] + count[s] − 1."""

    start: Tensor  # [S] int64
    count: Tensor  # [S] int64
    per_expert: int  # segment s belongs to expert s // per_expert
    experts: int  # segments ≥ experts · per_expert are a tail without GEMM


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _segment_tile(start_ptr, count_ptr, NUM_SEGMENTS, BLOCK_M: tl.constexpr, BLOCK_SEG: tl.constexpr):
    """This program's tile: (segment, rows [BLOCK_M], row mask). Past the last tile the segment
    is NUM_SEGMENTS and no row is valid."""
    seg = tl.arange(0, BLOCK_SEG)
    seg_ok = seg < NUM_SEGMENTS
    count = tl.load(count_ptr + seg, mask=seg_ok, other=0)
    start = tl.load(start_ptr + seg, mask=seg_ok, other=0)
    tiles = (count + BLOCK_M - 1) // BLOCK_M
    end = tl.cumsum(tiles, axis=0)
    tile = tl.program_id(0)
    s = tl.sum((end <= tile).to(tl.int32), axis=0)
    chosen = seg == s
    local = (tile - tl.sum(tl.where(chosen, end - tiles, 0), axis=0)) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.sum(tl.where(chosen, start, 0), axis=0) + local
    return s, rows.to(tl.int64), local < tl.sum(tl.where(chosen, count, 0), axis=0)


@triton.jit
def _output_tile(start_ptr, count_ptr, NUM_SEGMENTS, PER_EXPERT, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_SEG: tl.constexpr):
    """Program (i, j)'s output tile: (segment, its expert, rows [BLOCK_M], row mask, columns j·BLOCK_N … [BLOCK_N],
    column mask) for an output N columns wide."""
    s, rows, row_ok = _segment_tile(start_ptr, count_ptr, NUM_SEGMENTS, BLOCK_M, BLOCK_SEG)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return s, (s // PER_EXPERT).to(tl.int64), rows, row_ok, n, n < N


@triton.jit
def _rows_times_weight(a_ptr, a_rows, a_ok, K, w_ptr, stride_k, stride_n, n, n_ok, acc,
                       PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[a_rows, :K] · B[:K, n], B[k, n] = w_ptr[k·stride_k + n·stride_n]; A is row-major, K wide."""
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(a_ptr + a_rows[:, None] * K + k[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + k[:, None] * stride_k + n[None, :] * stride_n, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _normal_cdf(x):
    """Φ(x), the exact (erf) GELU gate."""
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _up_kernel(
    x_ptr, index_ptr, start_ptr, count_ptr, w_ptr, b_ptr, z_ptr, act_ptr, NUM_SEGMENTS, PER_EXPERT, d, h,
    GATHER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr,
):
    """z = x[index] · w_in[e]ᵀ + b_in[e] and act = GELU(z) for a tile of rows × hidden units."""
    s, expert, rows, row_ok, n, n_ok = _output_tile(start_ptr, count_ptr, NUM_SEGMENTS, PER_EXPERT, h, BLOCK_M, BLOCK_N,
                                                    BLOCK_SEG)
    source = tl.load(index_ptr + rows, mask=row_ok, other=0) if GATHER else rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _rows_times_weight(x_ptr, source, row_ok, tl.where(s < NUM_SEGMENTS, d, 0), w_ptr + expert * h * d,
                             1, d, n, n_ok, acc, PRECISION, BLOCK_K)
    z = acc + tl.load(b_ptr + expert * h + n, mask=n_ok & (s < NUM_SEGMENTS), other=0.0).to(tl.float32)[None, :]
    out = rows[:, None] * h + n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    tl.store(z_ptr + out, z, mask=mask)
    tl.store(act_ptr + out, z * _normal_cdf(z), mask=mask)


@triton.jit
def _down_kernel(
    act_ptr, start_ptr, count_ptr, w_ptr, b_ptr, index_ptr, gate_ptr, out_ptr, NUM_SEGMENTS, COMPUTED, PER_EXPERT,
    d, h, SCATTER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr,
):
    """out = act · w_out[e]ᵀ + b_out[e]; with SCATTER, y[index] = gate · out, and segments ≥
    COMPUTED (the tail) write y = 0."""
    s, expert, rows, row_ok, n, n_ok = _output_tile(start_ptr, count_ptr, NUM_SEGMENTS, PER_EXPERT, d, BLOCK_M, BLOCK_N,
                                                    BLOCK_SEG)
    computed = s < COMPUTED
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _rows_times_weight(act_ptr, rows, row_ok, tl.where(computed, h, 0), w_ptr + expert * d * h,
                             1, h, n, n_ok, acc, PRECISION, BLOCK_K)
    acc += tl.load(b_ptr + expert * d + n, mask=n_ok & computed, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    if SCATTER:
        token = tl.load(index_ptr + rows, mask=row_ok, other=0)
        gate = tl.load(gate_ptr + token, mask=row_ok, other=0.0)
        tl.store(out_ptr + token[:, None] * d + n[None, :], acc * gate[:, None], mask=mask)
    else:
        tl.store(out_ptr + rows[:, None] * d + n[None, :], acc, mask=mask)


@triton.jit
def _down_backward_kernel(
    dy_ptr, index_ptr, gate_ptr, start_ptr, count_ptr, w_ptr, b_ptr, z_ptr, act_ptr, dz_ptr, dgate_ptr,
    NUM_SEGMENTS, PER_EXPERT, d, h, GATHER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr,
):
    """g = dy[index] · w_out[e] on a tile of rows × hidden units, then dz = gate · g · GELU'(z).
    With GATHER also this tile's share of dgate: ⟨g, act⟩ over its hidden units, plus
    ⟨dy, b_out[e]⟩ in the first column tile, written to dgate[token, column tile]."""
    s, expert, rows, row_ok, n, n_ok = _output_tile(start_ptr, count_ptr, NUM_SEGMENTS, PER_EXPERT, h, BLOCK_M, BLOCK_N,
                                                    BLOCK_SEG)
    active = s < NUM_SEGMENTS
    column_tile = tl.program_id(1)
    token = tl.load(index_ptr + rows, mask=row_ok, other=0) if GATHER else rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _rows_times_weight(dy_ptr, token, row_ok, tl.where(active, d, 0), w_ptr + expert * d * h,
                             h, 1, n, n_ok, acc, PRECISION, BLOCK_K)
    out = rows[:, None] * h + n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    z = tl.load(z_ptr + out, mask=mask, other=0.0).to(tl.float32)
    if GATHER:
        act = tl.load(act_ptr + out, mask=mask, other=0.0).to(tl.float32)
        dgate = tl.sum(acc * act, axis=1)  # [BLOCK_M]
        bias_end = tl.where(column_tile == 0, d, 0)  # the bias term once per row, by the first column tile
        for start in range(0, bias_end, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            k_ok = k < d
            dy = tl.load(dy_ptr + token[:, None] * d + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bias = tl.load(b_ptr + expert * d + k, mask=k_ok, other=0.0)
            dgate += tl.sum(dy.to(tl.float32) * bias.to(tl.float32)[None, :], axis=1)
        tl.store(dgate_ptr + token * tl.num_programs(1) + column_tile, dgate, mask=row_ok)
        acc *= tl.load(gate_ptr + token, mask=row_ok, other=0.0)[:, None]
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # φ(z)
    tl.store(dz_ptr + out, acc * (_normal_cdf(z) + z * pdf), mask=mask)


@triton.jit
def _up_backward_kernel(
    dz_ptr, start_ptr, count_ptr, w_ptr, index_ptr, dlogits_ptr, router_ptr, out_ptr,
    NUM_SEGMENTS, COMPUTED, PER_EXPERT, d, h, E,
    SCATTER: tl.constexpr, PRECISION: tl.constexpr, ROUTER_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """dx = dz · w_in[e] on a tile of rows × model columns. With SCATTER the router's term
    dℓ[token] · W_router (fp32 dℓ, the router weight rounded to dz's dtype) is added and the sum
    written once to dx[token]; tail segments (≥ COMPUTED) get the router's term alone."""
    s, expert, rows, row_ok, n, n_ok = _output_tile(start_ptr, count_ptr, NUM_SEGMENTS, PER_EXPERT, d, BLOCK_M, BLOCK_N,
                                                    BLOCK_SEG)
    computed = s < COMPUTED
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _rows_times_weight(dz_ptr, rows, row_ok, tl.where(computed, h, 0), w_ptr + expert * h * d,
                             d, 1, n, n_ok, acc, PRECISION, BLOCK_K)
    mask = row_ok[:, None] & n_ok[None, :]
    if SCATTER:
        token = tl.load(index_ptr + rows, mask=row_ok, other=0)
        e = tl.arange(0, BLOCK_E)
        dlogits = tl.load(dlogits_ptr + token[:, None] * E + e[None, :], mask=row_ok[:, None] & (e < E)[None, :], other=0.0)
        router = tl.load(router_ptr + e[:, None] * d + n[None, :], mask=(e < E)[:, None] & n_ok[None, :], other=0.0)
        router = router.to(dz_ptr.dtype.element_ty).to(tl.float32)
        acc = tl.dot(dlogits, router, acc, input_precision=ROUTER_PRECISION)
        tl.store(out_ptr + token[:, None] * d + n[None, :], acc, mask=mask)
    else:
        tl.store(out_ptr + rows[:, None] * d + n[None, :], acc, mask=mask)


@triton.jit
def _weight_grad_kernel(
    a_ptr, a_index_ptr, a_scale_ptr, b_ptr, b_index_ptr, start_ptr, count_ptr, dw_ptr, db_ptr, PER_EXPERT, A, B,
    GATHER_A: tl.constexpr, SCALE_A: tl.constexpr, GATHER_B: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[e] = Σ_r a[r]ᵀ b[r] over expert e's segments ([A, B] tile (i, j)), and in column tile 0
    db[e] = Σ_r a[r]. a[r] = a_ptr[a_index[r]] (· a_scale[a_index[r]]) or a_ptr[r]; b likewise."""
    expert = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < A
    j_ok = j < B
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    bias = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p in range(PER_EXPERT):
        start = tl.load(start_ptr + expert * PER_EXPERT + p)
        count = tl.load(count_ptr + expert * PER_EXPERT + p)
        for r0 in range(0, count, BLOCK_K):
            local = r0 + tl.arange(0, BLOCK_K)
            ok = local < count
            rows = start + local
            a_rows = tl.load(a_index_ptr + rows, mask=ok, other=0) if GATHER_A else rows
            a = tl.load(a_ptr + a_rows[:, None] * A + i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
            if SCALE_A:
                scale = tl.load(a_scale_ptr + a_rows, mask=ok, other=0.0)
                a = (a.to(tl.float32) * scale[:, None]).to(a_ptr.dtype.element_ty)
            b_rows = tl.load(b_index_ptr + rows, mask=ok, other=0) if GATHER_B else rows
            b = tl.load(b_ptr + b_rows[:, None] * B + j[None, :], mask=ok[:, None] & j_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
            bias += tl.sum(a.to(tl.float32), axis=0)
    tl.store(dw_ptr + (expert * A + i[:, None]) * B + j[None, :], acc, mask=i_ok[:, None] & j_ok[None, :])
    tl.store(db_ptr + expert * A + i, bias, mask=i_ok & (tl.program_id(2) == 0))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _blocks(dtype: torch.dtype) -> dict[str, int]:
    """128 × 128 output tiles, 64 (16-bit) or 32 (fp32) deep: a common sm_90 starting point, not tuned."""
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if dtype.itemsize == 2 else 32, num_warps=8, num_stages=3)


def _row_grid(rows: int, segments: Segments, columns: int, blocks: dict) -> tuple[int, int]:
    """At most one partial tile per segment beyond cdiv(rows, BLOCK_M)."""
    return triton.cdiv(rows, blocks["BLOCK_M"]) + segments.start.shape[0], triton.cdiv(columns, blocks["BLOCK_N"])


def _segment_meta(segments: Segments) -> dict:
    return dict(BLOCK_SEG=max(16, triton.next_power_of_2(segments.start.shape[0])))


def up_projection(x: Tensor, index: Optional[Tensor], segments: Segments, rows: int, w_in: Tensor,
                  b_in: Tensor) -> tuple[Tensor, Tensor]:
    """(z, act) [rows, h] for the rows of the experts' segments (other rows are left unwritten);
    A rows are x[index[r]] or, without an index, x[r]."""
    h, d = w_in.shape[1:]
    z = x.new_empty(rows, h)  # [R, h]
    act = x.new_empty(rows, h)  # [R, h]
    blocks = _blocks(x.dtype)
    computed = segments.experts * segments.per_expert
    if rows and h:
        _up_kernel[_row_grid(rows, segments, h, blocks)](
            x.contiguous(), segments.start if index is None else index, segments.start, segments.count,
            w_in.contiguous(), b_in.contiguous(), z, act, computed, segments.per_expert, d, h,
            GATHER=index is not None, PRECISION=dot_precision(x.dtype), **_segment_meta(segments), **blocks,
        )
    return z, act


def down_projection(act: Tensor, segments: Segments, w_out: Tensor, b_out: Tensor,
                    scatter: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """act · w_out[e]ᵀ + b_out[e] per row. With scatter = (index, gate): y [T, d] with
    y[index[r]] = gate · out[r] and zeros for the tail's tokens; else out [rows, d] in place."""
    rows = act.shape[0]
    d, h = w_out.shape[1:]
    out = act.new_empty(rows, d)  # [R, d] (or [T, d] with T = R tokens)
    blocks = _blocks(act.dtype)
    index, gate = scatter if scatter is not None else (segments.start, segments.start)
    if rows and d:
        _down_kernel[_row_grid(rows, segments, d, blocks)](
            act, segments.start, segments.count, w_out.contiguous(), b_out.contiguous(), index, gate, out,
            segments.start.shape[0], segments.experts * segments.per_expert, segments.per_expert, d, h,
            SCATTER=scatter is not None, PRECISION=dot_precision(act.dtype), **_segment_meta(segments), **blocks,
        )
    return out


def down_backward(dy: Tensor, segments: Segments, w_out: Tensor, b_out: Tensor, z: Tensor, act: Tensor,
                  gather: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Optional[Tensor]]:
    """dz [rows, h] for the experts' rows; with gather = (index, gate), dy is read at dy[index[r]],
    scaled by the gate, and the gate's gradient comes back in column-tile parts [T, NJ]."""
    rows, h = z.shape
    d = w_out.shape[1]
    dz = torch.empty_like(z)  # [R, h]
    blocks = _blocks(z.dtype)
    grid = _row_grid(rows, segments, h, blocks)
    dgate_parts = dy.new_empty(dy.shape[0], grid[1], dtype=torch.float32) if gather is not None else None  # [T, NJ]
    index, gate = gather if gather is not None else (segments.start, segments.start)
    if rows and h:
        _down_backward_kernel[grid](
            dy.contiguous(), index, gate, segments.start, segments.count, w_out.contiguous(), b_out.contiguous(), z, act,
            dz, dz if dgate_parts is None else dgate_parts, segments.experts * segments.per_expert, segments.per_expert,
            d, h, GATHER=gather is not None, PRECISION=dot_precision(z.dtype), **_segment_meta(segments), **blocks,
        )
    return dz, dgate_parts


def up_backward(dz: Tensor, segments: Segments, w_in: Tensor,
                scatter: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
    """dz · w_in[e] per row. With scatter = (index, dℓ [T, E], W_router [E, d]): dx [T, d] with the
    router's term added, written once per token (the tail gets the router's term alone); else
    [rows, d] in place."""
    rows = dz.shape[0]
    h, d = w_in.shape[1:]
    out = dz.new_empty(rows, d)  # [R, d]
    blocks = _blocks(dz.dtype)
    index, dlogits, router = scatter if scatter is not None else (segments.start, dz, dz)
    num_experts = router.shape[0] if scatter is not None else 1
    if rows and d:
        _up_backward_kernel[_row_grid(rows, segments, d, blocks)](
            dz, segments.start, segments.count, w_in.contiguous(), index, dlogits, router.contiguous(), out,
            segments.start.shape[0], segments.experts * segments.per_expert, segments.per_expert, d, h, num_experts,
            SCATTER=scatter is not None, PRECISION=dot_precision(dz.dtype),
            ROUTER_PRECISION=dot_precision(torch.float32 if dz.dtype == torch.float32 else torch.bfloat16),
            BLOCK_E=max(16, triton.next_power_of_2(num_experts)), **_segment_meta(segments), **blocks,
        )
    return out


def weight_grad(a: Tensor, b: Tensor, segments: Segments, a_index: Optional[Tensor] = None,
                a_scale: Optional[Tensor] = None, b_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per expert e: dw[e] = Σ_r a[r]ᵀ b[r] [A, B] and db[e] = Σ_r a[r] [A] over e's segments, with
    a[r] = a[a_index[r]] · a_scale[a_index[r]] when given, b[r] = b[b_index[r]] when given."""
    A, B = a.shape[1], b.shape[1]
    dw = a.new_empty(segments.experts, A, B)
    db = a.new_empty(segments.experts, A)
    blocks = _blocks(a.dtype)
    grid = (segments.experts, triton.cdiv(A, blocks["BLOCK_M"]), triton.cdiv(B, blocks["BLOCK_N"]))
    if segments.experts and A and B:
        unused = segments.start
        _weight_grad_kernel[grid](
            a.contiguous(), unused if a_index is None else a_index, unused if a_scale is None else a_scale,
            b.contiguous(), unused if b_index is None else b_index, segments.start, segments.count, dw, db,
            segments.per_expert, A, B, GATHER_A=a_index is not None, SCALE_A=a_scale is not None,
            GATHER_B=b_index is not None, PRECISION=dot_precision(a.dtype), **blocks,
        )
    return dw, db
