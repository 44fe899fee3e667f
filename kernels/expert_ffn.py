"""Expert feed-forward on the expert-major buffer: GELU MLP per expert, batched.

Math: for each expert e, out[e] = GELU(buf[e] · W_in[e] + b_in[e]) · W_out[e] + b_out[e].
Every expert holds the same number of slots (its capacity per group × groups), so this is two
batched matmuls; cuBLAS does them at dense-GEMM speed.

The Triton path keeps the two cuBLAS bmm calls (uniform capacity makes a grouped GEMM pointless)
and changes what happens around them: bias + exact GELU run as one fused elementwise kernel (no
broadcast bias copy for baddbmm to read), and the backward recomputes GELU from the saved
pre-activation instead of saving its output. That keeps one [E, N, h] tensor per layer alive for
the backward instead of two (autograd on the reference saves both the baddbmm output and the GELU
output), at the price of one extra [E, N, h] write in the backward: one kernel reads the
pre-activation and the upstream gradient once and writes both GELU(x) and dpre:
    x = pre + b_in,  GELU(x) = x·Φ(x),  GELU'(x) = Φ(x) + x·φ(x)
    dpre = dact · GELU'(x),  db_in = Σ_n dpre,  dW_in = bufᵀ·dpre,  dbuf = dpre·W_inᵀ
    dact = dout · W_outᵀ,    dW_out = GELU(x)ᵀ·dout,  db_out = Σ_n dout
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_device, check_float


def expert_ffn_reference(buf: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """buf [E, N, d], w_in [E, d, h], b_in [E, h], w_out [E, h, d], b_out [E, d] → [E, N, d]."""
    hidden = torch.nn.functional.gelu(torch.baddbmm(b_in[:, None, :], buf, w_in))  # [E, N, h]
    return torch.baddbmm(b_out[:, None, :], hidden, w_out)  # [E, N, d]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _biased_tile(pre_ptr, bias_ptr, M, N, h, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """x = pre + b_in[expert] on a tile of the [M = E·N, h] pre-activation, in fp32; with offsets and mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (rows < M)[:, None] & (cols < h)[None, :]  # [BLOCK_M, BLOCK_H]
    offs = rows.to(tl.int64)[:, None] * h + cols[None, :]
    bias = tl.load(bias_ptr + (rows // N)[:, None] * h + cols[None, :], mask=mask, other=0.0)
    x = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias.to(tl.float32)
    return x, offs, mask


@triton.jit
def _normal_cdf(x):
    """Φ(x), the exact (erf) GELU gate."""
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _bias_gelu_fwd_kernel(pre_ptr, bias_ptr, act_ptr, M, N, h, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """act = GELU(pre + b_in[expert])."""
    x, offs, mask = _biased_tile(pre_ptr, bias_ptr, M, N, h, BLOCK_M, BLOCK_H)
    tl.store(act_ptr + offs, x * _normal_cdf(x), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    pre_ptr, bias_ptr, dact_ptr, act_ptr, dpre_ptr, M, N, h, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr
):
    """act = GELU(x) (recomputed) and dpre = dact · GELU'(x) with x = pre + b_in; dpre may overwrite dact."""
    x, offs, mask = _biased_tile(pre_ptr, bias_ptr, M, N, h, BLOCK_M, BLOCK_H)
    cdf = _normal_cdf(x)
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327  # φ(x)
    dact = tl.load(dact_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(act_ptr + offs, x * cdf, mask=mask)
    tl.store(dpre_ptr + offs, dact * (cdf + x * pdf), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _grid(pre: Tensor) -> tuple[tuple[int, int], dict[str, int]]:
    """Tiles of 4 rows × up to 256 hidden units over the [E·N, h] view of pre: 8 elements per
    thread, where bigger tiles only add registers (the backward reaches 116 at 16 × 128 on sm_90)."""
    experts, slots, hidden = pre.shape
    block_h = min(triton.next_power_of_2(max(hidden, 1)), 256)
    grid = (triton.cdiv(experts * slots, 4), triton.cdiv(hidden, block_h))
    return grid, dict(BLOCK_M=4, BLOCK_H=block_h)


def _bias_gelu(pre: Tensor, b_in: Tensor) -> Tensor:
    """pre [E, N, h], b_in [E, h] → GELU(pre + b_in) [E, N, h]."""
    act = torch.empty_like(pre)  # [E, N, h]
    experts, slots, hidden = pre.shape
    grid, blocks = _grid(pre)
    if pre.numel():
        _bias_gelu_fwd_kernel[grid](pre, b_in.contiguous(), act, experts * slots, slots, hidden, **blocks)
    return act


def _bias_gelu_backward(pre: Tensor, b_in: Tensor, dact: Tensor) -> Tensor:
    """→ GELU(pre + b_in) [E, N, h]; overwrites dact [E, N, h] with dpre, so no third buffer exists."""
    act = torch.empty_like(pre)  # [E, N, h]
    experts, slots, hidden = pre.shape
    grid, blocks = _grid(pre)
    if pre.numel():
        _bias_gelu_bwd_kernel[grid](pre, b_in.contiguous(), dact, act, dact, experts * slots, slots, hidden, **blocks)
    return act


def _check_ffn_inputs(buf: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> None:
    if buf.dim() != 3:
        raise ValueError(f"expert_ffn: buf must be [E, N, d], got {list(buf.shape)}")
    experts, _, d = buf.shape
    hidden = w_in.shape[-1] if w_in.dim() == 3 else -1
    expected = {
        "w_in": (experts, d, hidden),
        "b_in": (experts, hidden),
        "w_out": (experts, hidden, d),
        "b_out": (experts, d),
    }
    for name, tensor in zip(expected, (w_in, b_in, w_out, b_out)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"expert_ffn: {name} must be {list(expected[name])}, got {list(tensor.shape)}")
        if tensor.dtype != buf.dtype:
            raise ValueError(f"expert_ffn: {name} is {tensor.dtype} but buf is {buf.dtype}")
    check_float("expert_ffn", "buf", buf)
    check_device("expert_ffn", buf, w_in, b_in, w_out, b_out)


# ---------------------------------------------------------------------------------------------
# Autograd op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("limoe_kernels::expert_ffn_with_pre", mutates_args=())
def _expert_ffn_with_pre(
    buf: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor
) -> tuple[Tensor, Tensor]:
    """→ (out [E, N, d], pre = buf·W_in [E, N, h]); pre is returned only so the backward can keep it."""
    _check_ffn_inputs(buf, w_in, b_in, w_out, b_out)
    pre = torch.bmm(buf, w_in)  # [E, N, h]
    out = torch.baddbmm(b_out[:, None, :], _bias_gelu(pre, b_in), w_out)  # [E, N, d]
    return out, pre


@_expert_ffn_with_pre.register_fake
def _(buf: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> tuple[Tensor, Tensor]:
    experts, slots, d = buf.shape
    return buf.new_empty(experts, slots, d), buf.new_empty(experts, slots, w_in.shape[-1])


@torch.library.custom_op("limoe_kernels::bias_gelu_backward_", mutates_args=("dact",))
def _bias_gelu_backward_op(pre: Tensor, b_in: Tensor, dact: Tensor) -> Tensor:
    """The fused backward kernel as an op (so torch.compile can trace the backward graph):
    returns GELU(pre + b_in) and turns dact into dpre in place."""
    return _bias_gelu_backward(pre, b_in, dact)


@_bias_gelu_backward_op.register_fake
def _(pre: Tensor, b_in: Tensor, dact: Tensor) -> Tensor:
    return torch.empty_like(pre)


def _setup_context(ctx, inputs, output) -> None:
    buf, w_in, b_in, w_out, _ = inputs
    ctx.set_materialize_grads(False)  # pre never gets a gradient; do not allocate zeros for it
    ctx.save_for_backward(buf, w_in, b_in, w_out, output[1])


def _backward(ctx, dout: Tensor, _dpre: None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    buf, w_in, b_in, w_out, pre = ctx.saved_tensors
    dpre = torch.bmm(dout, w_out.transpose(1, 2))  # [E, N, h], dact until the next line
    act = _bias_gelu_backward_op(pre, b_in, dpre)  # [E, N, h]; dpre now holds dact · GELU'(x)
    dbuf = torch.bmm(dpre, w_in.transpose(1, 2))  # [E, N, d]
    dw_in = torch.bmm(buf.transpose(1, 2), dpre)  # [E, d, h]
    dw_out = torch.bmm(act.transpose(1, 2), dout)  # [E, h, d]
    return dbuf, dw_in, dpre.sum(dim=1), dw_out, dout.sum(dim=1)


_expert_ffn_with_pre.register_autograd(_backward, setup_context=_setup_context)


def expert_ffn(buf: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """Triton-fused bias+GELU between cuBLAS bmm: buf [E, N, d], w_in [E, d, h], b_in [E, h],
    w_out [E, h, d], b_out [E, d] → [E, N, d]."""
    return _expert_ffn_with_pre(buf, w_in, b_in, w_out, b_out)[0]
