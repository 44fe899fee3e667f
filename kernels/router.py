"""Top-1 router: softmax over all experts, argmax of the noisy logits, the chosen gate, and, in
the same pass, the per-(group, modality) sums the auxiliary losses are made of.

Math (V-MoE's noisy top-1 router): given logits ℓ = x·W of shape [T, E] and, in training, noise
n ~ N(0, σ²) with σ = 1/E:
    probs  = softmax(ℓ)              clean routing distribution
    expert = argmax(ℓ + n)           lowest index wins a tie
    gate   = softmax(ℓ + n)[expert]  the combine weight; not renormalised
Tokens come in G groups of S consecutive rows, each tagged with a modality m. Padding tokens
(m = −1) are not routed: they get expert −1 and gate 0.
Summed over the tokens of group g and modality m (padding in no sum):
    prob_sum[g, m, e]    Σ p_e                   importance, global entropy (marginal p̄)
    load_sum[g, m, e]    Σ Φ((ℓ_e − t)/σ)        load: the chance fresh noise lifts e over the winner,
                                                 t = ℓ_k + n_k the winning noisy logit
    entropy_sum[g, m]    Σ H(p)                  local entropy
    z_sum[g, m]          Σ logsumexp(ℓ)²         router z-loss
These are all the losses need, so the [T, E] tensors are read once, here, and the losses work on
[G, M, E] sums. The logits come from a cuBLAS matmul outside; this op is the row-wise part after it.

Backward, with p = softmax(ℓ), q = softmax(ℓ + n), k = expert, g = q_k and, for a token of
group g and modality m, the sums' upstream gradients dP = dprob_sum[g, m], dL, dH, dZ:
    dp   = dprobs + dP − dH · log p                    (the constant of d(−p log p)/dp cancels)
    dℓ   = p ⊙ (dp − ⟨dp, p⟩)                          through the clean softmax
         + dgate · g · (onehot(k) − q)                 through the noisy one
         + 2 · dZ · logsumexp(ℓ) · p                   through the z term
         + w − onehot(k) · Σ_e w,   w_e = dL_e · φ(u_e)/σ,  u_e = (ℓ_e − t)/σ   through the load term
The noise is sampled, not learned, so it gets no gradient. The Triton kernels run one program
per tile of rows inside one group; the forward writes each tile's partial sums and the launcher
adds the tiles of a group (a deterministic reduction, no atomics). The backward recomputes q
instead of saving it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_device, check_float, check_index


class RouterOutput(NamedTuple):
    """What the router returns, per token and summed per (group, modality)."""

    probs: Tensor  # [T, E] fp32 clean softmax
    expert: Tensor  # [T] int64 noisy top-1 expert, −1 for padding
    gate: Tensor  # [T] fp32 noisy probability of that expert, 0 for padding
    prob_sum: Tensor  # [G, M, E] fp32 Σ p over the group's tokens of modality m
    load_sum: Tensor  # [G, M, E] fp32 Σ Φ((ℓ_e − t)/σ) over the same tokens
    entropy_sum: Tensor  # [G, M] fp32 Σ H(p)
    z_sum: Tensor  # [G, M] fp32 Σ logsumexp(ℓ)²


def _layout(logits: Tensor, modality: Optional[Tensor], group_size: Optional[int],
            noise_std: Optional[float]) -> tuple[Tensor, int, float]:
    """Defaults: every token of modality 0, the whole batch one group, σ = 1/E (V-MoE's noise)."""
    tokens, num_experts = logits.shape[0], logits.shape[-1]  # the launcher checks the shape
    modality = torch.zeros(tokens, dtype=torch.int64, device=logits.device) if modality is None else modality
    return modality, max(tokens, 1) if group_size is None else group_size, 1.0 / num_experts if noise_std is None else noise_std


def top1_router_reference(
    logits: Tensor, noise: Optional[Tensor] = None, modality: Optional[Tensor] = None,
    group_size: Optional[int] = None, num_modalities: int = 1, noise_std: Optional[float] = None,
) -> RouterOutput:
    """Plain PyTorch: logits [T, E] (+ noise [T, E]), modality [T] (−1 padding), groups of
    `group_size` consecutive tokens → RouterOutput."""
    modality, group_size, noise_std = _layout(logits, modality, group_size, noise_std)
    tokens, num_experts = logits.shape
    groups = tokens // group_size
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    noisy = logits if noise is None else logits + noise.float()
    noisy_probs = probs if noise is None else torch.softmax(noisy, dim=-1)
    expert = noisy_probs.argmax(dim=-1)  # [T]
    gate = noisy_probs.gather(-1, expert[:, None]).squeeze(-1)  # [T]
    routed = modality >= 0  # [T]
    winner = noisy.gather(-1, expert[:, None])  # [T, 1]
    load = torch.special.ndtr((logits - winner) / noise_std)  # [T, E]
    token_entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum(dim=-1)  # [T]
    z = torch.logsumexp(logits, dim=-1).pow(2)  # [T]
    masks = (modality[:, None] == torch.arange(num_modalities, device=logits.device)).float()  # [T, M]
    masks = masks.view(groups, group_size, num_modalities)  # [G, S, M]

    def per_token(x: Tensor) -> Tensor:  # [T, E] → [G, S, E]
        return x.view(groups, group_size, -1)

    return RouterOutput(
        probs, torch.where(routed, expert, -1), torch.where(routed, gate, 0.0),
        prob_sum=torch.einsum("gsm,gse->gme", masks, per_token(probs)),
        load_sum=torch.einsum("gsm,gse->gme", masks, per_token(load)),
        entropy_sum=torch.einsum("gsm,gs->gm", masks, token_entropy.view(groups, group_size)),
        z_sum=torch.einsum("gsm,gs->gm", masks, z.view(groups, group_size)),
    )


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _group_tile(S, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (g, j): rows j·BLOCK_T … of group g (S rows each) × all experts, with masks."""
    local = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] row within the group
    rows = tl.program_id(0).to(tl.int64) * S + local
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_ok = local < S
    expert_ok = cols[None, :] < E
    mask = row_ok[:, None] & expert_ok  # [BLOCK_T, BLOCK_E]
    offs = rows[:, None] * E + cols[None, :]
    return rows, cols, row_ok, expert_ok, mask, offs


@triton.jit
def _row_softmax(z):
    """Softmax of a [BLOCK_T, BLOCK_E] tile along experts; padded experts hold −inf."""
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _row_logsumexp(z):
    top = tl.max(z, axis=1)
    return top + tl.log(tl.sum(tl.exp(z - top[:, None]), axis=1))


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
def _load_terms(logits, noisy, chosen, expert_ok, noise_std):
    """u = (ℓ − t)/σ with t the winner's noisy logit; 0 on padded experts (masked by the caller)."""
    winner = tl.sum(tl.where(chosen, noisy, 0.0), axis=1)  # [BLOCK_T]
    return tl.where(expert_ok, (logits - winner[:, None]) / noise_std, 0.0)


@triton.jit
def _router_fwd_kernel(
    logits_ptr, noise_ptr, modality_ptr, probs_ptr, expert_ptr, gate_ptr,
    prob_part_ptr, load_part_ptr, entropy_part_ptr, z_part_ptr, S, E, noise_std,
    M: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Per row: both softmaxes, the noisy argmax and its probability; per modality: this tile's
    partial sums, written to slot (g, j, m) of the [G, J, M, ·] partial-sum buffers."""
    rows, cols, row_ok, expert_ok, mask, offs = _group_tile(S, E, BLOCK_T, BLOCK_E)
    logits, noisy = _load_logits(logits_ptr, noise_ptr, offs, mask, expert_ok, HAS_NOISE)
    probs = _row_softmax(logits)
    noisy_probs = _row_softmax(noisy) if HAS_NOISE else probs
    expert = tl.argmax(noisy_probs, axis=1, tie_break_left=True)  # [BLOCK_T]
    modality = tl.load(modality_ptr + rows, mask=row_ok, other=-1)
    routed = modality >= 0  # padding: expert −1, gate 0
    tl.store(probs_ptr + offs, probs, mask=mask)
    tl.store(expert_ptr + rows, tl.where(routed, expert, -1), mask=row_ok)
    tl.store(gate_ptr + rows, tl.where(routed, tl.max(noisy_probs, axis=1), 0.0), mask=row_ok)

    chosen = cols[None, :] == expert[:, None]
    u = _load_terms(logits, noisy, chosen, expert_ok, noise_std)
    load = tl.where(expert_ok, 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)), 0.0)  # Φ(u)
    entropy = -tl.sum(probs * tl.log(tl.maximum(probs, 1e-30)), axis=1)  # [BLOCK_T]
    lse = _row_logsumexp(logits)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    for m in tl.static_range(M):
        selected = modality == m  # [BLOCK_T]
        slot = tile * M + m
        tl.store(prob_part_ptr + slot * E + cols, tl.sum(tl.where(selected[:, None], probs, 0.0), axis=0), mask=cols < E)
        tl.store(load_part_ptr + slot * E + cols, tl.sum(tl.where(selected[:, None], load, 0.0), axis=0), mask=cols < E)
        tl.store(entropy_part_ptr + slot, tl.sum(tl.where(selected, entropy, 0.0), axis=0))
        tl.store(z_part_ptr + slot, tl.sum(tl.where(selected, lse * lse, 0.0), axis=0))


@triton.jit
def _router_bwd_kernel(
    logits_ptr, noise_ptr, modality_ptr, probs_ptr, expert_ptr, gate_ptr, dprobs_ptr, dgate_ptr,
    dprob_sum_ptr, dload_sum_ptr, dentropy_sum_ptr, dz_sum_ptr, dlogits_ptr, S, E, noise_std,
    M: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dℓ per row (see the module docstring): each row reads its (group, modality) sum gradients.
    A padding row has gate 0, expert −1 and no sums, so only dprobs reaches it."""
    rows, cols, row_ok, expert_ok, mask, offs = _group_tile(S, E, BLOCK_T, BLOCK_E)
    logits, noisy = _load_logits(logits_ptr, noise_ptr, offs, mask, expert_ok, HAS_NOISE)
    probs = tl.load(probs_ptr + offs, mask=mask, other=0.0)
    modality = tl.load(modality_ptr + rows, mask=row_ok, other=-1)
    summed = row_ok & (modality >= 0)  # padding is in no sum
    segment = tl.program_id(0) * M + tl.where(summed, modality, 0)  # [BLOCK_T] index of (g, m)
    segment_offs = segment[:, None] * E + cols[None, :]
    segment_mask = summed[:, None] & expert_ok
    dprob_sum = tl.load(dprob_sum_ptr + segment_offs, mask=segment_mask, other=0.0)
    dload_sum = tl.load(dload_sum_ptr + segment_offs, mask=segment_mask, other=0.0)
    dentropy = tl.load(dentropy_sum_ptr + segment, mask=summed, other=0.0)
    dz = tl.load(dz_sum_ptr + segment, mask=summed, other=0.0)

    dprobs = tl.load(dprobs_ptr + offs, mask=mask, other=0.0).to(tl.float32) + dprob_sum
    dprobs -= dentropy[:, None] * tl.log(tl.maximum(probs, 1e-30))
    dlogits = probs * (dprobs - tl.sum(dprobs * probs, axis=1)[:, None])
    dlogits += (2.0 * dz * _row_logsumexp(logits))[:, None] * probs

    noisy_probs = _row_softmax(noisy) if HAS_NOISE else probs
    expert = tl.load(expert_ptr + rows, mask=row_ok, other=0)
    gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0)
    dgate = tl.load(dgate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    chosen = cols[None, :] == expert[:, None]
    dlogits += (dgate * gate)[:, None] * (chosen.to(tl.float32) - noisy_probs)

    u = _load_terms(logits, noisy, chosen, expert_ok, noise_std)
    w = tl.where(expert_ok, dload_sum * tl.exp(-0.5 * u * u) * (0.3989422804014327 / noise_std), 0.0)  # φ(u)/σ
    dlogits += w - tl.where(chosen, tl.sum(w, axis=1)[:, None], 0.0)
    tl.store(dlogits_ptr + offs, dlogits, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _blocks(num_experts: int, group_size: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_E): all experts of a row in one tile, about 1024 elements per tile (bigger
    tiles push the backward past 128 registers per thread on sm_90 and make it spill), and no
    more rows than a group has."""
    block_e = triton.next_power_of_2(num_experts)
    return max(1, min(1024 // block_e, triton.next_power_of_2(group_size))), block_e


def _check_router_inputs(logits: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int,
                         num_modalities: int, noise_std: float) -> None:
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"top1_router: logits must be [T, E] with E ≥ 1, got {list(logits.shape)}")
    check_float("top1_router", "logits", logits)
    if noise is not None:
        if noise.shape != logits.shape:
            raise ValueError(f"top1_router: noise {list(noise.shape)} must match logits {list(logits.shape)}")
        check_float("top1_router", "noise", noise)
    check_index("top1_router", "modality", modality, (logits.shape[0],))
    if group_size < 1 or logits.shape[0] % group_size:
        raise ValueError(f"top1_router: {logits.shape[0]} tokens do not split into groups of {group_size}")
    if num_modalities < 1 or not noise_std > 0:
        raise ValueError(f"top1_router: need num_modalities ≥ 1 and noise_std > 0, got {num_modalities}, {noise_std}")
    check_device("top1_router", logits, modality, *([] if noise is None else [noise]))


def _router_forward(logits: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int,
                    num_modalities: int, noise_std: float) -> tuple[Tensor, ...]:
    """Launch the forward kernel, then add each group's tile partials → RouterOutput's fields."""
    _check_router_inputs(logits, noise, modality, group_size, num_modalities, noise_std)
    logits, modality = logits.contiguous(), modality.contiguous()
    noise = None if noise is None else noise.contiguous()
    tokens, num_experts = logits.shape
    groups = tokens // group_size
    block_t, block_e = _blocks(num_experts, group_size)
    tiles = triton.cdiv(group_size, block_t)
    probs = logits.new_empty(tokens, num_experts, dtype=torch.float32)  # [T, E]
    expert = logits.new_empty(tokens, dtype=torch.int64)  # [T]
    gate = logits.new_empty(tokens, dtype=torch.float32)  # [T]
    prob_part = logits.new_empty(groups, tiles, num_modalities, num_experts, dtype=torch.float32)  # [G, J, M, E]
    load_part = torch.empty_like(prob_part)  # [G, J, M, E]
    entropy_part = logits.new_empty(groups, tiles, num_modalities, dtype=torch.float32)  # [G, J, M]
    z_part = torch.empty_like(entropy_part)  # [G, J, M]
    if groups:
        _router_fwd_kernel[(groups, tiles)](
            logits, logits if noise is None else noise, modality, probs, expert, gate,
            prob_part, load_part, entropy_part, z_part, group_size, num_experts, noise_std,
            M=num_modalities, HAS_NOISE=noise is not None, BLOCK_T=block_t, BLOCK_E=block_e,
        )
    return probs, expert, gate, prob_part.sum(1), load_part.sum(1), entropy_part.sum(1), z_part.sum(1)


def _router_backward(logits: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int, noise_std: float,
                     saved: tuple[Tensor, Tensor, Tensor], grads: list[Tensor]) -> Tensor:
    """Launch the backward kernel; saved = (probs, expert, gate), grads = the upstream gradients
    of (probs, gate, prob_sum, load_sum, entropy_sum, z_sum) → dlogits [T, E] in the logits' dtype."""
    logits = logits.contiguous()
    noise = None if noise is None else noise.contiguous()
    tokens, num_experts = logits.shape
    num_modalities = grads[2].shape[1]
    dlogits = torch.empty_like(logits)  # [T, E]
    block_t, block_e = _blocks(num_experts, group_size)
    if tokens:
        _router_bwd_kernel[(tokens // group_size, triton.cdiv(group_size, block_t))](
            logits, logits if noise is None else noise, modality.contiguous(), *saved, *(g.contiguous() for g in grads),
            dlogits, group_size, num_experts, noise_std,
            M=num_modalities, HAS_NOISE=noise is not None, BLOCK_T=block_t, BLOCK_E=block_e,
        )
    return dlogits


# ---------------------------------------------------------------------------------------------
# Autograd ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("limoe_kernels::top1_router", mutates_args=())
def _top1_router(logits: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int, num_modalities: int,
                 noise_std: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _router_forward(logits, noise, modality, group_size, num_modalities, noise_std)


@_top1_router.register_fake
def _(logits, noise, modality, group_size, num_modalities, noise_std):
    tokens, num_experts = logits.shape
    groups = tokens // group_size
    return (
        logits.new_empty(tokens, num_experts, dtype=torch.float32),
        logits.new_empty(tokens, dtype=torch.int64),
        logits.new_empty(tokens, dtype=torch.float32),
        logits.new_empty(groups, num_modalities, num_experts, dtype=torch.float32),
        logits.new_empty(groups, num_modalities, num_experts, dtype=torch.float32),
        logits.new_empty(groups, num_modalities, dtype=torch.float32),
        logits.new_empty(groups, num_modalities, dtype=torch.float32),
    )


@torch.library.custom_op("limoe_kernels::top1_router_backward", mutates_args=())
def _top1_router_backward(
    logits: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int, noise_std: float,
    probs: Tensor, expert: Tensor, gate: Tensor, dprobs: Tensor, dgate: Tensor, dprob_sum: Tensor,
    dload_sum: Tensor, dentropy_sum: Tensor, dz_sum: Tensor,
) -> Tensor:
    """The backward kernel as an op of its own, so torch.compile can trace the backward graph."""
    grads = [dprobs, dgate, dprob_sum, dload_sum, dentropy_sum, dz_sum]
    return _router_backward(logits, noise, modality, group_size, noise_std, (probs, expert, gate), grads)


@_top1_router_backward.register_fake
def _(logits, *rest) -> Tensor:
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, noise, modality, ctx.group_size, _, ctx.noise_std = inputs
    probs, expert, gate = output[:3]
    ctx.has_noise = noise is not None
    ctx.save_for_backward(logits, modality, probs, expert, gate, *([noise] if ctx.has_noise else []))


def _backward(ctx, dprobs, _dexpert, dgate, dprob_sum, dload_sum, dentropy_sum, dz_sum):
    logits, modality, probs, expert, gate, *noise = ctx.saved_tensors
    dlogits = _top1_router_backward(
        logits, noise[0] if ctx.has_noise else None, modality, ctx.group_size, ctx.noise_std,
        probs, expert, gate, dprobs, dgate, dprob_sum, dload_sum, dentropy_sum, dz_sum,
    )
    return dlogits, None, None, None, None, None


_top1_router.register_autograd(_backward, setup_context=_setup_context)


def top1_router(
    logits: Tensor, noise: Optional[Tensor] = None, modality: Optional[Tensor] = None,
    group_size: Optional[int] = None, num_modalities: int = 1, noise_std: Optional[float] = None,
) -> RouterOutput:
    """Triton: the same function as `top1_router_reference`, in one forward and one backward kernel."""
    modality, group_size, noise_std = _layout(logits, modality, group_size, noise_std)
    return RouterOutput(*_top1_router(logits, noise, modality, group_size, num_modalities, noise_std))
