"""Top-1 router: softmax over all experts, argmax of the noisy logits, the chosen gate.

Math (V-MoE's noisy top-1 router): given logits ℓ = x·W of shape [T, E] and, in training, noise
n ~ N(0, (1/E)²):
    probs  = softmax(ℓ)              clean routing distribution (auxiliary losses read it)
    expert = argmax(ℓ + n)           lowest index wins a tie
    gate   = softmax(ℓ + n)[expert]  the combine weight; not renormalised
The logits come from a cuBLAS matmul outside; this op is the row-wise part after it.

Backward, with p = softmax(ℓ), q = softmax(ℓ + n), k = expert, g = q_k:
    dℓ = p ⊙ (dp − ⟨dp, p⟩)          through the clean softmax
       + dg · g · (onehot(k) − q)     through the noisy one (dq_k/dz = q_k(δ_k − q))
The noise is sampled, not learned, so it gets no gradient. The Triton kernels do the forward in one
pass per row block and recompute q in the backward instead of saving it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._launch import check_device, check_float


def top1_router_reference(logits: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Plain PyTorch: logits [T, E] (+ noise [T, E]) → probs [T, E] fp32, expert [T] int64, gate [T] fp32."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    noisy_probs = probs if noise is None else torch.softmax(logits + noise.float(), dim=-1)
    expert = noisy_probs.argmax(dim=-1)  # [T]
    gate = noisy_probs.gather(-1, expert[:, None]).squeeze(-1)  # [T]
    return probs, expert, gate


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_tile(T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's BLOCK_T rows × BLOCK_E experts of the row-major [T, E] arrays, with masks."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_ok = rows < T
    expert_ok = cols[None, :] < E
    mask = row_ok[:, None] & expert_ok  # [BLOCK_T, BLOCK_E]
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    return rows, cols, row_ok, expert_ok, mask, offs


@triton.jit
def _row_softmax(z):
    """Softmax of a [BLOCK_T, BLOCK_E] tile along experts; padded experts hold −inf."""
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _load_logits(logits_ptr, noise_ptr, offs, mask, expert_ok, HAS_NOISE: tl.constexpr):
    """Clean and noisy logits of a tile in fp32; padded experts get −inf so softmax ignores them."""
    logits = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    logits = tl.where(expert_ok, logits, float("-inf"))
    if HAS_NOISE:
        noisy = logits + tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        noisy = logits
    return logits, noisy


@triton.jit
def _router_fwd_kernel(
    logits_ptr, noise_ptr, probs_ptr, expert_ptr, gate_ptr, T, E,
    HAS_NOISE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program per BLOCK_T rows: both softmaxes, the noisy argmax and its probability."""
    rows, cols, row_ok, expert_ok, mask, offs = _row_tile(T, E, BLOCK_T, BLOCK_E)
    logits, noisy = _load_logits(logits_ptr, noise_ptr, offs, mask, expert_ok, HAS_NOISE)
    probs = _row_softmax(logits)
    noisy_probs = _row_softmax(noisy) if HAS_NOISE else probs
    tl.store(probs_ptr + offs, probs, mask=mask)
    tl.store(expert_ptr + rows, tl.argmax(noisy_probs, axis=1, tie_break_left=True), mask=row_ok)
    tl.store(gate_ptr + rows, tl.max(noisy_probs, axis=1), mask=row_ok)


@triton.jit
def _router_bwd_kernel(
    logits_ptr, noise_ptr, probs_ptr, expert_ptr, gate_ptr, dprobs_ptr, dgate_ptr, dlogits_ptr, T, E,
    HAS_NOISE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dℓ from dprobs through the clean softmax plus dgate through the (recomputed) noisy one."""
    rows, cols, row_ok, expert_ok, mask, offs = _row_tile(T, E, BLOCK_T, BLOCK_E)
    probs = tl.load(probs_ptr + offs, mask=mask, other=0.0)
    dprobs = tl.load(dprobs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dlogits = probs * (dprobs - tl.sum(dprobs * probs, axis=1)[:, None])
    if HAS_NOISE:
        _, noisy = _load_logits(logits_ptr, noise_ptr, offs, mask, expert_ok, HAS_NOISE)
        noisy_probs = _row_softmax(noisy)
    else:
        noisy_probs = probs
    expert = tl.load(expert_ptr + rows, mask=row_ok, other=0)
    gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0)
    dgate = tl.load(dgate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    chosen = (cols[None, :] == expert[:, None]).to(tl.float32)
    dlogits += (dgate * gate)[:, None] * (chosen - noisy_probs)
    tl.store(dlogits_ptr + offs, dlogits, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _blocks(num_experts: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_E): all experts of a row in one tile, about 1024 elements per tile (bigger
    tiles push the backward past 128 registers per thread on sm_90 and make it spill)."""
    block_e = triton.next_power_of_2(num_experts)
    return max(1, 1024 // block_e), block_e


def _check_router_inputs(logits: Tensor, noise: Optional[Tensor]) -> None:
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"top1_router: logits must be [T, E] with E ≥ 1, got {list(logits.shape)}")
    check_float("top1_router", "logits", logits)
    if noise is not None:
        if noise.shape != logits.shape:
            raise ValueError(f"top1_router: noise {list(noise.shape)} must match logits {list(logits.shape)}")
        check_float("top1_router", "noise", noise)
    check_device("top1_router", logits, *([] if noise is None else [noise]))


def _router_forward(logits: Tensor, noise: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel: logits [T, E] (+ noise) → probs [T, E] fp32, expert [T] int64, gate [T] fp32."""
    _check_router_inputs(logits, noise)
    logits = logits.contiguous()
    noise = None if noise is None else noise.contiguous()
    tokens, num_experts = logits.shape
    probs = logits.new_empty(tokens, num_experts, dtype=torch.float32)  # [T, E]
    expert = logits.new_empty(tokens, dtype=torch.int64)  # [T]
    gate = logits.new_empty(tokens, dtype=torch.float32)  # [T]
    block_t, block_e = _blocks(num_experts)
    _router_fwd_kernel[(triton.cdiv(tokens, block_t),)](
        logits, logits if noise is None else noise, probs, expert, gate, tokens, num_experts,
        HAS_NOISE=noise is not None, BLOCK_T=block_t, BLOCK_E=block_e,
    )
    return probs, expert, gate


def _router_backward(
    logits: Tensor, noise: Optional[Tensor], probs: Tensor, expert: Tensor, gate: Tensor, dprobs: Tensor, dgate: Tensor
) -> Tensor:
    """Launch the backward kernel → dlogits [T, E] in the logits' dtype."""
    logits = logits.contiguous()
    noise = None if noise is None else noise.contiguous()
    tokens, num_experts = logits.shape
    dlogits = torch.empty_like(logits)  # [T, E]
    block_t, block_e = _blocks(num_experts)
    _router_bwd_kernel[(triton.cdiv(tokens, block_t),)](
        logits, logits if noise is None else noise, probs, expert, gate, dprobs.contiguous(), dgate.contiguous(),
        dlogits, tokens, num_experts, HAS_NOISE=noise is not None, BLOCK_T=block_t, BLOCK_E=block_e,
    )
    return dlogits


# ---------------------------------------------------------------------------------------------
# Autograd ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("limoe_kernels::top1_router", mutates_args=())
def top1_router(logits: Tensor, noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Triton: logits [T, E] (+ noise [T, E]) → probs [T, E] fp32, expert [T] int64, gate [T] fp32."""
    return _router_forward(logits, noise)


@top1_router.register_fake
def _(logits: Tensor, noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    tokens, num_experts = logits.shape
    return (
        logits.new_empty(tokens, num_experts, dtype=torch.float32),
        logits.new_empty(tokens, dtype=torch.int64),
        logits.new_empty(tokens, dtype=torch.float32),
    )


@torch.library.custom_op("limoe_kernels::top1_router_backward", mutates_args=())
def _top1_router_backward(
    logits: Tensor, noise: Optional[Tensor], probs: Tensor, expert: Tensor, gate: Tensor, dprobs: Tensor, dgate: Tensor
) -> Tensor:
    """The backward kernel as an op of its own, so torch.compile can trace the backward graph."""
    return _router_backward(logits, noise, probs, expert, gate, dprobs, dgate)


@_top1_router_backward.register_fake
def _(logits, noise, probs, expert, gate, dprobs, dgate) -> Tensor:
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, noise = inputs
    probs, expert, gate = output
    ctx.has_noise = noise is not None
    ctx.save_for_backward(logits, *([noise] if ctx.has_noise else []), probs, expert, gate)


def _backward(ctx, dprobs: Tensor, _dexpert: Tensor, dgate: Tensor) -> tuple[Tensor, None]:
    if ctx.has_noise:
        logits, noise, probs, expert, gate = ctx.saved_tensors
    else:
        (logits, probs, expert, gate), noise = ctx.saved_tensors, None
    return _top1_router_backward(logits, noise, probs, expert, gate, dprobs, dgate), None


top1_router.register_autograd(_backward, setup_context=_setup_context)
