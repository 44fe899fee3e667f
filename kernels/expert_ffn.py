"""Expert feed-forward on an expert-major row buffer, as expert parallelism exchanges it.

Math: for each expert e, out[e] = GELU(buf[e] · w_in[e]ᵀ + b_in[e]) · w_out[e]ᵀ + b_out[e]
(Linear layout: w_in [E, h, d], b_in [E, h], w_out [E, d, h], b_out [E, d]). Expert e's N rows
are P equal slabs, one per source rank, and slab p holds counts[e, p] filled rows at its start;
the rest is padding of the fixed-size exchange.

The reference runs two batched matmuls over every row. The Triton op runs the grouped GEMMs of
`grouped_gemm` over the filled rows only, with bias and GELU in the first GEMM's epilogue; rows
past a slab's count are not computed, so their outputs and input gradients are unspecified (the
exchange sends them back, and combine and dispatch never read them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._launch import check_device, check_float, check_index
from .grouped_gemm import Segments, down_backward, down_projection, up_backward, up_projection, weight_grad


def expert_ffn_reference(buf: Tensor, counts: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor,
                         b_out: Tensor) -> Tensor:
    """buf [E, N, d], counts [E, P] (unused: every row is computed) → [E, N, d]."""
    hidden = torch.nn.functional.gelu(torch.baddbmm(b_in[:, None, :], buf, w_in.transpose(1, 2)))  # [E, N, h]
    return torch.baddbmm(b_out[:, None, :], hidden, w_out.transpose(1, 2))  # [E, N, d]


def check_expert_weights(op: str, experts: int, d: int, dtype: torch.dtype, w_in: Tensor, b_in: Tensor,
                         w_out: Tensor, b_out: Tensor) -> None:
    """w_in [E, h, d], b_in [E, h], w_out [E, d, h], b_out [E, d], all in the rows' dtype."""
    hidden = w_in.shape[1] if w_in.dim() == 3 else -1
    expected = {"w_in": (experts, hidden, d), "b_in": (experts, hidden), "w_out": (experts, d, hidden),
                "b_out": (experts, d)}
    for name, tensor in zip(expected, (w_in, b_in, w_out, b_out)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{op}: {name} must be {list(expected[name])}, got {list(tensor.shape)}")
        if tensor.dtype != dtype:
            raise ValueError(f"{op}: {name} is {tensor.dtype} but the token rows are {dtype}")


def _check_ffn_inputs(buf: Tensor, counts: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> None:
    if buf.dim() != 3:
        raise ValueError(f"expert_ffn: buf must be [E, N, d], got {list(buf.shape)}")
    experts, slots, d = buf.shape
    if counts.dim() != 2 or counts.shape[0] != experts or counts.shape[1] < 1 or slots % counts.shape[1]:
        raise ValueError(f"expert_ffn: counts must be [E, P] with P dividing N = {slots}, got {list(counts.shape)}")
    check_index("expert_ffn", "counts", counts, tuple(counts.shape))
    check_expert_weights("expert_ffn", experts, d, buf.dtype, w_in, b_in, w_out, b_out)
    check_float("expert_ffn", "buf", buf)
    check_device("expert_ffn", buf, counts, w_in, b_in, w_out, b_out)


def _segments(buf: Tensor, counts: Tensor) -> Segments:
    """Slab p of expert e is segment e·P + p, starting at row (e·P + p)·N/P."""
    experts, slots, _ = buf.shape
    per_expert = counts.shape[1]
    slab = slots // per_expert
    start = torch.arange(experts * per_expert, device=buf.device) * slab  # [E·P]
    return Segments(start, counts.reshape(-1).contiguous(), per_expert, experts)


@torch.library.custom_op("limoe_kernels::expert_ffn", mutates_args=())
def _expert_ffn(buf: Tensor, counts: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor,
                b_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """→ (out [E, N, d], z and act [E·N, h]); z and act are returned only so the backward can keep them."""
    _check_ffn_inputs(buf, counts, w_in, b_in, w_out, b_out)
    experts, slots, d = buf.shape
    segments = _segments(buf, counts)
    z, act = up_projection(buf.reshape(-1, d), None, segments, experts * slots, w_in, b_in)
    return down_projection(act, segments, w_out, b_out).view(experts, slots, d), z, act


@_expert_ffn.register_fake
def _(buf, counts, w_in, b_in, w_out, b_out):
    experts, slots, _ = buf.shape
    hidden = w_in.shape[1]
    return torch.empty_like(buf), buf.new_empty(experts * slots, hidden), buf.new_empty(experts * slots, hidden)


@torch.library.custom_op("limoe_kernels::expert_ffn_backward", mutates_args=())
def _expert_ffn_backward(
    buf: Tensor, counts: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor, z: Tensor, act: Tensor,
    dout: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernels as an op of their own, so torch.compile can trace the backward graph."""
    experts, slots, d = buf.shape
    segments = _segments(buf, counts)
    dout = dout.reshape(-1, d).contiguous()
    dz, _ = down_backward(dout, segments, w_out, b_out, z, act)
    dw_out, db_out = weight_grad(dout, act, segments)
    dbuf = up_backward(dz, segments, w_in).view(experts, slots, d)
    dw_in, db_in = weight_grad(dz, buf.reshape(-1, d), segments)
    return dbuf, dw_in, db_in, dw_out, db_out


@_expert_ffn_backward.register_fake
def _(buf, counts, w_in, b_in, w_out, b_out, z, act, dout):
    return torch.empty_like(buf), torch.empty_like(w_in), torch.empty_like(b_in), torch.empty_like(w_out), \
        torch.empty_like(b_out)


def _setup_context(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # z and act never get a gradient
    ctx.save_for_backward(*inputs, output[1], output[2])


def _backward(ctx, dout, _dz, _dact):
    buf, counts, w_in, b_in, w_out, b_out, z, act = ctx.saved_tensors
    dbuf, dw_in, db_in, dw_out, db_out = _expert_ffn_backward(buf, counts, w_in, b_in, w_out, b_out, z, act, dout)
    return dbuf, None, dw_in, db_in, dw_out, db_out


_expert_ffn.register_autograd(_backward, setup_context=_setup_context)


def expert_ffn(buf: Tensor, counts: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """Triton grouped GEMMs over the filled rows: buf [E, N, d], counts [E, P] → [E, N, d]."""
    return _expert_ffn(buf, counts, w_in, b_in, w_out, b_out)[0]
