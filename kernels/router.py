"""Top-1 router: the router GEMM, softmax over all experts, argmax of the noisy logits, the chosen
gate, and, from the same pass, the auxiliary losses and routing statistics.

Math (V-MoE's noisy top-1 router): token rows x [T, d] in the compute dtype (bf16 under autocast),
router weight W [E, d] (fp32 master weights, rounded to the compute dtype for the GEMM),
    ℓ = x · Wᵀ                       the GEMM in the compute dtype, accumulated and kept in fp32
and in training noise n ~ N(0, σ²), σ = 1/E:
    probs  = softmax(ℓ)              clean routing distribution
    expert = argmax(ℓ + n)           lowest index wins a tie
    gate   = softmax(ℓ + n)[expert]  the combine weight; not renormalised
Tokens come in G groups of S consecutive rows, each tagged with a modality m. Padding tokens
(m = −1) are not routed: they get expert −1 and gate 0 and are in no sum. Per group g and
modality m the router sums
    P[g, m, e] = Σ p_e               importance, global entropy (marginal p̄)
    L[g, m, e] = Σ Φ((ℓ_e − t)/σ)    load: the chance fresh noise lifts e over the winner,
                                     t = ℓ_k + n_k the winning noisy logit
    N[g, m]    = number of tokens    (Σ_e of the routed counts R[g, m, e])
    Hs[g, m]   = Σ H(p),  Zs[g, m] = Σ logsumexp(ℓ)²
and turns them into what the layer returns (all fp32):
    importance  = mean_g CV²(Σ_m P[g, m, ·])                         V-MoE importance loss
    load        = mean_g CV²(Σ_m L[g, m, ·] / max(Σ_m N[g, m], 1))   V-MoE load loss
    z           = Σ Zs / max(Σ N, 1)                                 ST-MoE router z-loss
    token_entropy[g, m]    = Hs / max(N, 1)                          LIMoE local entropy
    marginal_entropy[g, m] = H(P[g, m, ·] / max(N, 1))               LIMoE global entropy
    present[g, m] = N > 0;  routed[m, e] = Σ_g R;  prob_sum[m, e] = Σ_g P;  entropy_sum[m] = Σ_g Hs
with CV²(v) = var(v) / max(mean(v)², 1e-12) (population variance). Each modality is normalised by
its own token count, so a short caption weighs as much as an image's many patches.

Backward. The loss terms' gradients turn into per-(g, m) gradients of the sums, dP, dL, dHs, dZs
(written out in `_group_sum_grads`); then, per token of group g and modality m, with
p = softmax(ℓ), q = softmax(ℓ + n), k = expert, g_k = q_k:
    dp   = dP − dHs · log p                            (the constant of d(−p log p)/dp cancels)
    dℓ   = p ⊙ (dp − ⟨dp, p⟩)                          through the clean softmax
         + dgate · g_k · (onehot(k) − q)               through the noisy one
         + 2 · dZs · logsumexp(ℓ) · p                  through the z term
         + w − onehot(k) · Σ_e w,   w_e = dL_e · φ(u_e)/σ,  u_e = (ℓ_e − t)/σ   through the load term
    dx   = dℓ · W  (fp32 dℓ, W in the compute dtype),   dW = Σ_t dℓᵀ · x
The noise is sampled, not learned, so it gets no gradient.

Kernels: the forward runs one program per tile of rows inside one group: the GEMM over d, then
everything per row, then the tile's partial sums; a one-program finishing kernel adds the tiles
of each group (a fixed order: deterministic, no atomics) and evaluates the loss terms. The
backward kernel recomputes each group's sum gradients from the saved sums (a few E-sized
vectors), recomputes q from the saved logits and the noise, and writes dℓ — or, used on its own,
dx — plus its tile's share of dW, which the launcher adds up.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_device, check_float, check_index, dot_precision

EPS_MEAN_SQUARED = 1e-12  # CV² denominator floor
EPS_PROB = 1e-30  # log floor


class RouterOutput(NamedTuple):
    """What the router returns: per token, per (group, modality), and summed over groups."""

    gate: Tensor  # [T] fp32 noisy probability of the chosen expert, 0 for padding
    expert: Tensor  # [T] int64 noisy top-1 expert, −1 for padding
    importance: Tensor  # [] V-MoE importance CV², mean over groups
    load: Tensor  # [] V-MoE load CV², mean over groups
    z: Tensor  # [] router z-loss, mean over routed tokens
    token_entropy: Tensor  # [G, M] mean H(p(x)) over the group's tokens of modality m
    marginal_entropy: Tensor  # [G, M] H(mean p(x)) over the same tokens
    present: Tensor  # [G, M] bool, the group holds tokens of modality m
    routed: Tensor  # [M, E] fp32 tokens whose top-1 expert is e (statistic, no gradient)
    prob_sum: Tensor  # [M, E] fp32 Σ p(x) (statistic, no gradient)
    entropy_sum: Tensor  # [M] fp32 Σ H(p(x)) (statistic, no gradient)


DIFFERENTIABLE = ("gate", "importance", "load", "z", "token_entropy", "marginal_entropy")


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def squared_coefficient_of_variation(values: Tensor) -> Tensor:
    """(std/mean)² along the last axis with the population std: V-MoE's balance penalty."""
    return values.var(dim=-1, unbiased=False) / values.mean(dim=-1).pow(2).clamp(min=EPS_MEAN_SQUARED)


def importance_loss(prob_sum: Tensor) -> Tensor:
    """V-MoE importance loss. prob_sum [G, M, E]: Σ p_e(x) per group, modality and expert → scalar.

    Imp_e = Σ_x p_e(x) over all the group's tokens; loss = CV(Imp)², averaged over groups.
    """
    return squared_coefficient_of_variation(prob_sum.sum(dim=1)).mean()


def load_loss(load_sum: Tensor, counts: Tensor) -> Tensor:
    """V-MoE load loss. load_sum [G, M, E], counts [G, M] tokens → scalar.

    load_sum holds Σ_x P(expert e is chosen for x) = Σ_x Φ((ℓ_e(x) − t(x)) / σ), t(x) the winning
    noisy logit: the probability that fresh noise lifts ℓ_e over the winner. load_e = mean over
    the group's tokens; loss = CV(load)², averaged over groups.
    """
    load = load_sum.sum(dim=1) / counts.sum(dim=1, keepdim=True).clamp(min=1)  # [G, E]
    return squared_coefficient_of_variation(load).mean()


def router_z_loss(z_sum: Tensor, counts: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)². z_sum, counts [G, M]."""
    return z_sum.sum() / counts.sum().clamp(min=1)


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) along the last axis; 0·log 0 = 0."""
    return -(probs * torch.log(probs.clamp(min=EPS_PROB))).sum(dim=-1)


def modality_entropies(prob_sum: Tensor, entropy_sum: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per group and modality: mean token entropy, marginal entropy, and whether present.

    prob_sum [G, M, E] Σ p(x), entropy_sum [G, M] Σ H(p(x)), counts [G, M] tokens →
      token_entropy [G, M]:    mean over m's tokens of H(p(x))       (LIMoE local entropy)
      marginal_entropy [G, M]: H(mean over m's tokens of p(x))       (LIMoE global entropy)
      present [G, M] bool:     the group has tokens of modality m
    """
    tokens = counts.clamp(min=1)
    return entropy_sum / tokens, entropy(prob_sum / tokens[..., None]), counts > 0


class RouterSums(NamedTuple):
    """The row-wise part of the router: choices per token and sums per (group, modality)."""

    expert: Tensor  # [T] int64, −1 for padding
    gate: Tensor  # [T] fp32, 0 for padding
    prob_sum: Tensor  # [G, M, E] Σ p
    load_sum: Tensor  # [G, M, E] Σ Φ((ℓ_e − t)/σ)
    routed: Tensor  # [G, M, E] tokens whose top-1 expert is e
    entropy_sum: Tensor  # [G, M] Σ H(p)
    z_sum: Tensor  # [G, M] Σ logsumexp(ℓ)²


def _layout(tokens: int, num_experts: int, device, modality: Optional[Tensor], group_size: Optional[int],
            noise_std: Optional[float]) -> tuple[Tensor, int, float]:
    """Defaults: every token of modality 0, the whole batch one group, σ = 1/E (V-MoE's noise)."""
    modality = torch.zeros(tokens, dtype=torch.int64, device=device) if modality is None else modality
    return modality, max(tokens, 1) if group_size is None else group_size, 1.0 / num_experts if noise_std is None else noise_std


def route_logits_reference(
    logits: Tensor, noise: Optional[Tensor] = None, modality: Optional[Tensor] = None,
    group_size: Optional[int] = None, num_modalities: int = 1, noise_std: Optional[float] = None,
) -> RouterSums:
    """Plain PyTorch, after the GEMM: logits [T, E] (+ noise [T, E]), modality [T] (−1 padding),
    groups of `group_size` consecutive tokens → RouterSums."""
    tokens, num_experts = logits.shape
    modality, group_size, noise_std = _layout(tokens, num_experts, logits.device, modality, group_size, noise_std)
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
    z = torch.logsumexp(logits, dim=-1).pow(2)  # [T]
    masks = (modality[:, None] == torch.arange(num_modalities, device=logits.device)).float()  # [T, M]
    masks = masks.view(groups, group_size, num_modalities)  # [G, S, M]

    def per_group(x: Tensor) -> Tensor:  # Σ over each group's tokens of modality m: [T, ·] → [G, M, ·]
        return torch.einsum("gsm,gse->gme", masks, x.reshape(groups, group_size, -1))

    return RouterSums(
        torch.where(routed, expert, -1), torch.where(routed, gate, 0.0),
        prob_sum=per_group(probs),
        load_sum=per_group(load),
        routed=per_group(F.one_hot(expert, num_experts).float()),
        entropy_sum=per_group(entropy(probs)).squeeze(-1),
        z_sum=per_group(z).squeeze(-1),
    )


def router_losses_reference(sums: RouterSums) -> RouterOutput:
    """The loss terms and statistics from the per-(group, modality) sums."""
    counts = sums.routed.sum(dim=-1)  # [G, M]
    token_entropy, marginal_entropy, present = modality_entropies(sums.prob_sum, sums.entropy_sum, counts)
    return RouterOutput(
        sums.gate, sums.expert,
        importance=importance_loss(sums.prob_sum),
        load=load_loss(sums.load_sum, counts),
        z=router_z_loss(sums.z_sum, counts),
        token_entropy=token_entropy,
        marginal_entropy=marginal_entropy,
        present=present,
        routed=sums.routed.sum(dim=0),
        prob_sum=sums.prob_sum.detach().sum(dim=0),
        entropy_sum=sums.entropy_sum.detach().sum(dim=0),
    )


def router_logits_reference(x: Tensor, w: Tensor) -> Tensor:
    """ℓ = x · Wᵀ with both operands in x's dtype, accumulated and returned in fp32."""
    return F.linear(x.float(), w.to(x.dtype).float())


def top1_router_reference(
    x: Tensor, w: Tensor, noise: Optional[Tensor] = None, modality: Optional[Tensor] = None,
    group_size: Optional[int] = None, num_modalities: int = 1, noise_std: Optional[float] = None,
) -> RouterOutput:
    """Plain PyTorch: x [T, d], w [E, d], noise [T, E], modality [T] → RouterOutput."""
    sums = route_logits_reference(router_logits_reference(x, w), noise, modality, group_size, num_modalities, noise_std)
    return router_losses_reference(sums)


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
def _noisy_logits(logits, noise_ptr, offs, mask, HAS_NOISE: tl.constexpr):
    if HAS_NOISE:
        return logits + tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return logits


@triton.jit
def _load_terms(logits, noisy, chosen, expert_ok, noise_std):
    """u = (ℓ − t)/σ with t the winner's noisy logit; 0 on padded experts (masked by the caller)."""
    winner = tl.sum(tl.where(chosen, noisy, 0.0), axis=1)  # [BLOCK_T]
    return tl.where(expert_ok, (logits - winner[:, None]) / noise_std, 0.0)


@triton.jit
def _router_fwd_kernel(
    x_ptr, w_ptr, noise_ptr, modality_ptr, logits_ptr, expert_ptr, gate_ptr,
    prob_part_ptr, load_part_ptr, routed_part_ptr, entropy_part_ptr, z_part_ptr, S, E, d, noise_std,
    M: tl.constexpr, HAS_NOISE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ℓ = x·Wᵀ for the tile, then per row both softmaxes, the noisy argmax and its probability;
    per modality the tile's partial sums, written to slot (g, j, m) of the [G, J, M, ·] buffers."""
    rows, cols, row_ok, expert_ok, mask, offs = _group_tile(S, E, BLOCK_T, BLOCK_E)
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        k = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * d + k[None, :], mask=row_ok[:, None] & (k < d)[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * d + k[None, :], mask=(cols < E)[:, None] & (k < d)[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    logits = tl.where(expert_ok, acc, float("-inf"))
    tl.store(logits_ptr + offs, logits, mask=mask)
    noisy = _noisy_logits(logits, noise_ptr, offs, mask, HAS_NOISE)
    probs = _row_softmax(logits)
    noisy_probs = _row_softmax(noisy) if HAS_NOISE else probs
    expert = tl.argmax(noisy_probs, axis=1, tie_break_left=True)  # [BLOCK_T]
    modality = tl.load(modality_ptr + rows, mask=row_ok, other=-1)
    routed = modality >= 0  # padding: expert −1, gate 0
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
        out = slot * E + cols
        tl.store(prob_part_ptr + out, tl.sum(tl.where(selected[:, None], probs, 0.0), axis=0), mask=cols < E)
        tl.store(load_part_ptr + out, tl.sum(tl.where(selected[:, None], load, 0.0), axis=0), mask=cols < E)
        tl.store(routed_part_ptr + out, tl.sum((selected[:, None] & chosen).to(tl.float32), axis=0), mask=cols < E)
        tl.store(entropy_part_ptr + slot, tl.sum(tl.where(selected, entropy, 0.0), axis=0))
        tl.store(z_part_ptr + slot, tl.sum(tl.where(selected, lse * lse, 0.0), axis=0))


@triton.jit
def _squared_cv(v, valid, E):
    """CV² of each row of v [R, BLOCK_E] over the E valid columns → [R]."""
    mean = tl.sum(tl.where(valid, v, 0.0), axis=1) / E
    centred = tl.where(valid, v - mean[:, None], 0.0)
    return tl.sum(centred * centred, axis=1) / E / tl.maximum(mean * mean, 1e-12)


@triton.jit
def _router_finish_kernel(
    prob_part_ptr, load_part_ptr, routed_part_ptr, entropy_part_ptr, z_part_ptr,
    prob_sum_ptr, load_sum_ptr, counts_ptr, token_entropy_ptr, marginal_entropy_ptr, present_ptr,
    importance_ptr, load_ptr, z_ptr, tokens_ptr, routed_ptr, prob_total_ptr, entropy_total_ptr, G, J, E,
    M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program: add each group's J tile partials in order, evaluate the loss terms per group,
    and reduce over groups; tokens = the number of routed tokens."""
    gs = tl.arange(0, BLOCK_G)[:, None, None]  # [BG, 1, 1]
    ms = tl.arange(0, BLOCK_M)[None, :, None]  # [1, BM, 1]
    es = tl.arange(0, BLOCK_E)[None, None, :]  # [1, 1, BE]
    m_ok = ms < M
    e_ok = es < E
    importance = 0.0
    load = 0.0
    z = 0.0
    count = 0.0
    routed_total = tl.zeros([1, BLOCK_M, BLOCK_E], dtype=tl.float32)
    prob_total = tl.zeros([1, BLOCK_M, BLOCK_E], dtype=tl.float32)
    entropy_total = tl.zeros([1, BLOCK_M], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + gs  # [BG, 1, 1]
        ok = (g < G) & m_ok & e_ok  # [BG, BM, BE]
        ok_gm = (g < G) & m_ok  # [BG, BM, 1]
        P = tl.zeros([BLOCK_G, BLOCK_M, BLOCK_E], dtype=tl.float32)
        L = tl.zeros([BLOCK_G, BLOCK_M, BLOCK_E], dtype=tl.float32)
        R = tl.zeros([BLOCK_G, BLOCK_M, BLOCK_E], dtype=tl.float32)
        Hs = tl.zeros([BLOCK_G, BLOCK_M, 1], dtype=tl.float32)
        Zs = tl.zeros([BLOCK_G, BLOCK_M, 1], dtype=tl.float32)
        for j in range(J):
            part = ((g * J + j) * M + ms) * E + es
            P += tl.load(prob_part_ptr + part, mask=ok, other=0.0)
            L += tl.load(load_part_ptr + part, mask=ok, other=0.0)
            R += tl.load(routed_part_ptr + part, mask=ok, other=0.0)
            Hs += tl.load(entropy_part_ptr + (g * J + j) * M + ms, mask=ok_gm, other=0.0)
            Zs += tl.load(z_part_ptr + (g * J + j) * M + ms, mask=ok_gm, other=0.0)
        out = (g * M + ms) * E + es
        tl.store(prob_sum_ptr + out, P, mask=ok)
        tl.store(load_sum_ptr + out, L, mask=ok)
        N = tl.sum(R, axis=2)  # [BG, BM]
        gm = tl.reshape(g * M + ms, [BLOCK_G, BLOCK_M])
        gm_ok = tl.reshape(ok_gm, [BLOCK_G, BLOCK_M])
        tl.store(counts_ptr + gm, N, mask=gm_ok)
        tokens = tl.maximum(N, 1.0)
        tl.store(token_entropy_ptr + gm, tl.reshape(Hs, [BLOCK_G, BLOCK_M]) / tokens, mask=gm_ok)
        q = P / tokens[:, :, None]
        marginal = -tl.sum(tl.where(ok, q * tl.log(tl.maximum(q, 1e-30)), 0.0), axis=2)
        tl.store(marginal_entropy_ptr + gm, marginal, mask=gm_ok)
        tl.store(present_ptr + gm, N > 0, mask=gm_ok)

        group_ok = tl.reshape(g < G, [BLOCK_G])
        e_valid = tl.reshape(es < E, [1, BLOCK_E])
        imp = _squared_cv(tl.sum(P, axis=1), e_valid, E)  # [BG]
        group_tokens = tl.maximum(tl.sum(N, axis=1), 1.0)  # [BG]
        lod = _squared_cv(tl.sum(L, axis=1) / group_tokens[:, None], e_valid, E)
        importance += tl.sum(tl.where(group_ok, imp, 0.0), axis=0)
        load += tl.sum(tl.where(group_ok, lod, 0.0), axis=0)
        z += tl.sum(Zs)
        count += tl.sum(N)
        routed_total += tl.sum(R, axis=0)[None, :, :]
        prob_total += tl.sum(P, axis=0)[None, :, :]
        entropy_total += tl.reshape(tl.sum(Hs, axis=0), [1, BLOCK_M])
    tl.store(importance_ptr, importance / G)
    tl.store(load_ptr, load / G)
    tl.store(z_ptr, z / tl.maximum(count, 1.0))
    tl.store(tokens_ptr, count)
    me = ms * E + es
    tl.store(routed_ptr + me, routed_total, mask=m_ok & e_ok)
    tl.store(prob_total_ptr + me, prob_total, mask=m_ok & e_ok)
    m_flat = tl.arange(0, BLOCK_M)[None, :]
    tl.store(entropy_total_ptr + m_flat, entropy_total, mask=m_flat < M)


@triton.jit
def _cv_grad(v, valid, E):
    """d CV²(v)/dv for each row of v [R, BLOCK_E] (the denominator's floor included)."""
    mean = tl.sum(tl.where(valid, v, 0.0), axis=1) / E  # [R]
    centred = tl.where(valid, v - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / E
    square = mean * mean
    floored = tl.maximum(square, 1e-12)
    dmean = tl.where(square > 1e-12, -var / (floored * floored) * 2.0 * mean, 0.0)  # d/dmean of var/max(mean², ε)
    return tl.where(valid, (2.0 * centred / E) / floored[:, None] + dmean[:, None] / E, 0.0)


@triton.jit
def _group_sum_grads(
    prob_sum_ptr, load_sum_ptr, counts_ptr, tokens_ptr, d_importance_ptr, d_load_ptr, d_z_ptr,
    d_token_entropy_ptr, d_marginal_ptr, group, G, E, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Group `group`'s sum gradients from the loss terms' upstream gradients:
        dP[m, e]  = d_importance/G · ∂CV²(Σ_m P)/∂I_e − d_marginal[m] · (log q_e + [q_e > 0]) / n_m
        dL[m, e]  = d_load/G · ∂CV²(λ)/∂λ_e / n,   λ = Σ_m L / n,  n = max(Σ_m N, 1)
        dHs[m]    = d_token_entropy[m] / n_m,       dZs = d_z / max(Σ N, 1)
    with n_m = max(N[m], 1) and q = P[m] / n_m. → dP, dL [BLOCK_M, BLOCK_E], dHs [BLOCK_M], dZs."""
    ms = tl.arange(0, BLOCK_M)[:, None]
    es = tl.arange(0, BLOCK_E)[None, :]
    ok = (ms < M) & (es < E)
    offs = (group * M + ms) * E + es
    P = tl.load(prob_sum_ptr + offs, mask=ok, other=0.0)
    L = tl.load(load_sum_ptr + offs, mask=ok, other=0.0)
    m_flat = tl.arange(0, BLOCK_M)
    N = tl.load(counts_ptr + group * M + m_flat, mask=m_flat < M, other=0.0)  # [BM]
    d_importance = tl.load(d_importance_ptr)
    d_load = tl.load(d_load_ptr)
    d_z = tl.load(d_z_ptr)
    total = tl.load(tokens_ptr)
    d_token = tl.load(d_token_entropy_ptr + group * M + m_flat, mask=m_flat < M, other=0.0)
    d_marginal = tl.load(d_marginal_ptr + group * M + m_flat, mask=m_flat < M, other=0.0)

    valid = es < E  # [1, BE]
    dP = _cv_grad(tl.sum(P, axis=0)[None, :], valid, E) * (d_importance / G)  # [1, BE], the same for every m
    tokens = tl.maximum(N, 1.0)
    q = P / tokens[:, None]
    dq = -(tl.log(tl.maximum(q, 1e-30)) + (q > 1e-30).to(tl.float32))
    dP = tl.where(ok, dP + d_marginal[:, None] * dq / tokens[:, None], 0.0)
    n = tl.maximum(tl.sum(N, axis=0), 1.0)
    dL = _cv_grad(tl.sum(L, axis=0)[None, :] / n, valid, E) * (d_load / G) / n  # [1, BE]
    dL = tl.where(ok, dL, 0.0)
    return dP, dL, d_token / tokens, d_z / tl.maximum(total, 1.0)


@triton.jit
def _router_bwd_kernel(
    x_ptr, w_ptr, logits_ptr, noise_ptr, modality_ptr, expert_ptr, gate_ptr, slot_ptr, dgate_ptr,
    prob_sum_ptr, load_sum_ptr, counts_ptr, tokens_ptr, d_importance_ptr, d_load_ptr, d_z_ptr,
    d_token_entropy_ptr, d_marginal_ptr, out_ptr, dw_part_ptr, S, E, d, G, NJ, noise_std,
    M: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_DX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dℓ per row (see the module docstring). The gate's gradient arrives as NJ partial sums per
    token (dgate [T, NJ]), read only for tokens that kept a slot (slot ≥ 0). Writes dℓ [T, E]
    (fp32), or dx = dℓ·W [T, d] with WRITE_DX, and this tile's dW partial Σ dℓᵀ·x [E, d]."""
    rows, cols, row_ok, expert_ok, mask, offs = _group_tile(S, E, BLOCK_T, BLOCK_E)
    group = tl.program_id(0)
    dP, dL, dHs, dZs = _group_sum_grads(prob_sum_ptr, load_sum_ptr, counts_ptr, tokens_ptr, d_importance_ptr,
                                        d_load_ptr, d_z_ptr, d_token_entropy_ptr, d_marginal_ptr, group, G, E,
                                        M, BLOCK_M, BLOCK_E)
    logits = tl.where(expert_ok, tl.load(logits_ptr + offs, mask=mask, other=0.0), float("-inf"))
    noisy = _noisy_logits(logits, noise_ptr, offs, mask, HAS_NOISE)
    probs = _row_softmax(logits)
    modality = tl.load(modality_ptr + rows, mask=row_ok, other=-1)
    dprobs = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    dload = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    dentropy = tl.zeros([BLOCK_T], dtype=tl.float32)
    dz = tl.zeros([BLOCK_T], dtype=tl.float32)
    m_rows = tl.arange(0, BLOCK_M)[:, None]
    for m in tl.static_range(M):  # each row takes its modality's sum gradients; padding takes none
        selected = (modality == m)[:, None]
        dprobs += tl.where(selected, tl.sum(tl.where(m_rows == m, dP, 0.0), axis=0)[None, :], 0.0)
        dload += tl.where(selected, tl.sum(tl.where(m_rows == m, dL, 0.0), axis=0)[None, :], 0.0)
        dentropy += tl.where(modality == m, tl.sum(tl.where(tl.arange(0, BLOCK_M) == m, dHs, 0.0), axis=0), 0.0)
        dz += tl.where(modality == m, dZs, 0.0)

    dprobs -= dentropy[:, None] * tl.log(tl.maximum(probs, 1e-30))
    dlogits = probs * (dprobs - tl.sum(dprobs * probs, axis=1)[:, None])
    dlogits += (2.0 * dz * _row_logsumexp(logits))[:, None] * probs

    noisy_probs = _row_softmax(noisy) if HAS_NOISE else probs
    expert = tl.load(expert_ptr + rows, mask=row_ok, other=0)
    gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0)
    kept = tl.load(slot_ptr + rows, mask=row_ok, other=-1) >= 0
    parts = tl.arange(0, BLOCK_J)
    dgate = tl.sum(tl.load(dgate_ptr + rows[:, None] * NJ + parts[None, :],
                           mask=(row_ok & kept)[:, None] & (parts < NJ)[None, :], other=0.0), axis=1)
    chosen = cols[None, :] == expert[:, None]
    dlogits += (dgate * gate)[:, None] * (chosen.to(tl.float32) - noisy_probs)

    u = _load_terms(logits, noisy, chosen, expert_ok, noise_std)
    spread = tl.where(expert_ok, dload * tl.exp(-0.5 * u * u) * (0.3989422804014327 / noise_std), 0.0)  # w: φ(u)/σ
    dlogits += spread - tl.where(chosen, tl.sum(spread, axis=1)[:, None], 0.0)
    dlogits = tl.where(mask, dlogits, 0.0)
    if not WRITE_DX:
        tl.store(out_ptr + offs, dlogits, mask=mask)
    tile = group * tl.num_programs(1) + tl.program_id(1)
    for start in range(0, d, BLOCK_D):
        k = start + tl.arange(0, BLOCK_D)
        k_ok = k < d
        x = tl.load(x_ptr + rows[:, None] * d + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dw = tl.dot(tl.trans(dlogits), x.to(tl.float32), input_precision=PRECISION)  # [BE, BD]
        tl.store(dw_part_ptr + (tile * E + cols[:, None]) * d + k[None, :], dw, mask=(cols < E)[:, None] & k_ok[None, :])
        if WRITE_DX:
            router = tl.load(w_ptr + cols[:, None] * d + k[None, :], mask=(cols < E)[:, None] & k_ok[None, :], other=0.0)
            dx = tl.dot(dlogits, router.to(x.dtype).to(tl.float32), input_precision=PRECISION)  # [BT, BD]
            tl.store(out_ptr + rows[:, None] * d + k[None, :], dx, mask=row_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _blocks(num_experts: int, group_size: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_D): all experts of a row in one tile (at least 16 wide, the
    smallest tl.dot), 64 rows (no more than a group has, but at least 16) and 64 columns of d
    per GEMM step."""
    block_e = max(16, triton.next_power_of_2(num_experts))
    return max(16, min(64, triton.next_power_of_2(group_size))), block_e, 64


class RouterState(NamedTuple):
    """What the backward needs besides the inputs: the logits and the per-group sums."""

    logits: Tensor  # [T, E] fp32
    prob_sum: Tensor  # [G, M, E]
    load_sum: Tensor  # [G, M, E]
    counts: Tensor  # [G, M] tokens per group and modality
    tokens: Tensor  # [] routed tokens in all groups


def _check_router_inputs(x: Tensor, w: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int,
                         num_modalities: int, noise_std: float) -> None:
    if x.dim() != 2 or w.dim() != 2 or w.shape[1] != x.shape[1] or w.shape[0] < 1:
        raise ValueError(f"top1_router: x must be [T, d] and w [E, d] with E ≥ 1, got {list(x.shape)} and {list(w.shape)}")
    check_float("top1_router", "x", x)
    check_float("top1_router", "w", w)
    if noise is not None:
        if tuple(noise.shape) != (x.shape[0], w.shape[0]):
            raise ValueError(f"top1_router: noise {list(noise.shape)} must be [T, E] = {[x.shape[0], w.shape[0]]}")
        check_float("top1_router", "noise", noise)
    check_index("top1_router", "modality", modality, (x.shape[0],))
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"top1_router: {x.shape[0]} tokens do not split into groups of {group_size}")
    if num_modalities < 1 or not noise_std > 0:
        raise ValueError(f"top1_router: need num_modalities ≥ 1 and noise_std > 0, got {num_modalities}, {noise_std}")
    check_device("top1_router", x, w, modality, *([] if noise is None else [noise]))


def router_forward(x: Tensor, w: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int,
                   num_modalities: int, noise_std: float) -> tuple[RouterOutput, RouterState]:
    """Launch the GEMM-and-route kernel and the finishing kernel."""
    _check_router_inputs(x, w, noise, modality, group_size, num_modalities, noise_std)
    x, w, modality = x.contiguous(), w.contiguous(), modality.contiguous()
    noise = None if noise is None else noise.contiguous()
    (tokens, d), num_experts, M = x.shape, w.shape[0], num_modalities
    groups = tokens // group_size
    block_t, block_e, block_d = _blocks(num_experts, group_size)
    tiles = triton.cdiv(group_size, block_t)
    f32 = dict(dtype=torch.float32, device=x.device)
    logits = torch.empty(tokens, num_experts, **f32)  # [T, E]
    expert = torch.empty(tokens, dtype=torch.int64, device=x.device)  # [T]
    gate = torch.empty(tokens, **f32)  # [T]
    prob_part, load_part, routed_part = (torch.empty(groups, tiles, M, num_experts, **f32) for _ in range(3))
    entropy_part, z_part = (torch.empty(groups, tiles, M, **f32) for _ in range(2))
    if groups:
        _router_fwd_kernel[(groups, tiles)](
            x, w, x if noise is None else noise, modality, logits, expert, gate,
            prob_part, load_part, routed_part, entropy_part, z_part, group_size, num_experts, d, noise_std,
            M=M, HAS_NOISE=noise is not None, PRECISION=dot_precision(x.dtype),
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d,
        )
    prob_sum, load_sum = torch.empty(groups, M, num_experts, **f32), torch.empty(groups, M, num_experts, **f32)
    counts, token_entropy, marginal_entropy = (torch.empty(groups, M, **f32) for _ in range(3))
    present = torch.empty(groups, M, dtype=torch.bool, device=x.device)
    importance, load, z, routed_tokens = (torch.empty((), **f32) for _ in range(4))
    routed, prob_total = torch.empty(M, num_experts, **f32), torch.empty(M, num_experts, **f32)
    entropy_total = torch.empty(M, **f32)
    _router_finish_kernel[(1,)](
        prob_part, load_part, routed_part, entropy_part, z_part,
        prob_sum, load_sum, counts, token_entropy, marginal_entropy, present,
        importance, load, z, routed_tokens, routed, prob_total, entropy_total, groups, tiles, num_experts,
        M=M, BLOCK_G=16, BLOCK_M=triton.next_power_of_2(M), BLOCK_E=triton.next_power_of_2(num_experts),
    )
    output = RouterOutput(gate, expert, importance, load, z, token_entropy, marginal_entropy, present,
                          routed, prob_total, entropy_total)
    return output, RouterState(logits, prob_sum, load_sum, counts, routed_tokens)


def router_backward(x: Tensor, w: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int,
                    noise_std: float, output: RouterOutput, state: RouterState, slot: Tensor, dgate_parts: Tensor,
                    loss_grads: "LossGrads", write_dx: bool) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel; dgate_parts [T, NJ] holds the gate's gradient in NJ partial sums
    (read where slot ≥ 0), loss_grads the upstream gradients of the loss terms.
    → (dℓ [T, E] fp32, or dx [T, d] in x's dtype with `write_dx`; dW [E, d] fp32)."""
    x = x.contiguous()
    noise = None if noise is None else noise.contiguous()
    (tokens, d), num_experts = x.shape, w.shape[0]
    groups, M = state.counts.shape
    block_t, block_e, block_d = _blocks(num_experts, group_size)
    tiles = triton.cdiv(group_size, block_t)
    out = torch.empty_like(x) if write_dx else torch.empty(tokens, num_experts, dtype=torch.float32, device=x.device)
    dw_part = torch.empty(groups * tiles, num_experts, d, dtype=torch.float32, device=x.device)
    if groups:
        _router_bwd_kernel[(groups, tiles)](
            x, w.contiguous(), state.logits, x if noise is None else noise, modality.contiguous(), output.expert,
            output.gate, slot.contiguous(), dgate_parts.contiguous(), state.prob_sum, state.load_sum, state.counts,
            state.tokens, *(g.contiguous() for g in loss_grads), out, dw_part, group_size, num_experts, d, groups, dgate_parts.shape[1], noise_std,
            M=M, HAS_NOISE=noise is not None, WRITE_DX=write_dx, PRECISION=dot_precision(x.dtype),
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d,
            BLOCK_J=triton.next_power_of_2(dgate_parts.shape[1]), BLOCK_M=triton.next_power_of_2(M),
        )
    return out, dw_part.sum(dim=0)


class LossGrads(NamedTuple):
    """The upstream gradients of the router's loss terms, as the backward kernel reads them."""

    importance: Tensor  # []
    load: Tensor  # []
    z: Tensor  # []
    token_entropy: Tensor  # [G, M]
    marginal_entropy: Tensor  # [G, M]

    @classmethod
    def of(cls, grads: dict[str, Optional[Tensor]], output: RouterOutput) -> "LossGrads":
        """From the autograd gradients by output name; zeros for outputs that got none."""
        return cls(*(torch.zeros_like(getattr(output, name)) if grads.get(name) is None else grads[name].float()
                     for name in cls._fields))


# ---------------------------------------------------------------------------------------------
# Autograd op (used where the router runs on its own; the fused layer calls the launchers)
# ---------------------------------------------------------------------------------------------


NUM_OUTPUTS = len(RouterOutput._fields)
RouterTensors = tuple[(Tensor,) * (NUM_OUTPUTS + len(RouterState._fields))]  # the custom op's flat result


@torch.library.custom_op("limoe_kernels::top1_router", mutates_args=())
def _top1_router(
    x: Tensor, w: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int, num_modalities: int,
    noise_std: float,
) -> RouterTensors:
    """→ the 11 RouterOutput fields, then the 5 RouterState fields the backward needs."""
    output, state = router_forward(x, w, noise, modality, group_size, num_modalities, noise_std)
    return (*output, *state)


def fake_router_outputs(x: Tensor, w: Tensor, group_size: int, num_modalities: int) -> tuple[Tensor, ...]:
    """Empty tensors with the shapes and dtypes of (*RouterOutput, *RouterState)."""
    tokens, num_experts, M = x.shape[0], w.shape[0], num_modalities
    groups = tokens // group_size
    f32 = dict(dtype=torch.float32)
    return (
        x.new_empty(tokens, **f32), x.new_empty(tokens, dtype=torch.int64),
        x.new_empty((), **f32), x.new_empty((), **f32), x.new_empty((), **f32),
        x.new_empty(groups, M, **f32), x.new_empty(groups, M, **f32), x.new_empty(groups, M, dtype=torch.bool),
        x.new_empty(M, num_experts, **f32), x.new_empty(M, num_experts, **f32), x.new_empty(M, **f32),
        x.new_empty(tokens, num_experts, **f32), x.new_empty(groups, M, num_experts, **f32),
        x.new_empty(groups, M, num_experts, **f32), x.new_empty(groups, M, **f32), x.new_empty((), **f32),
    )


@_top1_router.register_fake
def _(x, w, noise, modality, group_size, num_modalities, noise_std):
    return fake_router_outputs(x, w, group_size, num_modalities)


@torch.library.custom_op("limoe_kernels::top1_router_backward", mutates_args=())
def _top1_router_backward(
    x: Tensor, w: Tensor, noise: Optional[Tensor], modality: Tensor, group_size: int, noise_std: float,
    saved: list[Tensor], dgate: Tensor, d_importance: Tensor, d_load: Tensor, d_z: Tensor, d_token_entropy: Tensor,
    d_marginal: Tensor,
) -> tuple[Tensor, Tensor]:
    """The backward kernel as an op of its own, so torch.compile can trace the backward graph."""
    output, state = RouterOutput(*saved[:NUM_OUTPUTS]), RouterState(*saved[NUM_OUTPUTS:])
    grads = LossGrads(d_importance, d_load, d_z, d_token_entropy, d_marginal)
    # No slot filter here: every routed token's gate gradient counts (expert ≥ 0; padding has gate 0).
    dx, dw = router_backward(x, w, noise, modality, group_size, noise_std, output, state, output.expert,
                             dgate[:, None], grads, write_dx=True)
    return dx, dw.to(w.dtype)


@_top1_router_backward.register_fake
def _(x, w, *rest):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output) -> None:
    x, w, noise, modality, ctx.group_size, _, ctx.noise_std = inputs
    ctx.has_noise = noise is not None
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*(output[RouterOutput._fields.index(name)] for name in ("routed", "prob_sum", "entropy_sum")))
    ctx.save_for_backward(x, w, modality, *output, *([noise] if ctx.has_noise else []))


def _backward(ctx, *grads):
    x, w, modality, *rest = ctx.saved_tensors
    saved, noise = rest[:len(grads)], rest[len(grads):]
    named = dict(zip(RouterOutput._fields, grads))
    output = RouterOutput(*saved[:NUM_OUTPUTS])
    dgate = torch.zeros_like(output.gate) if named["gate"] is None else named["gate"].float()
    dx, dw = _top1_router_backward(x, w, noise[0] if ctx.has_noise else None, modality, ctx.group_size, ctx.noise_std,
                                   list(saved), dgate, *LossGrads.of(named, output))
    return dx, dw, None, None, None, None, None


_top1_router.register_autograd(_backward, setup_context=_setup_context)


def top1_router(
    x: Tensor, w: Tensor, noise: Optional[Tensor] = None, modality: Optional[Tensor] = None,
    group_size: Optional[int] = None, num_modalities: int = 1, noise_std: Optional[float] = None,
) -> RouterOutput:
    """Triton: the same function as `top1_router_reference`, in two forward and one backward kernel."""
    modality, group_size, noise_std = _layout(x.shape[0], w.shape[0], x.device, modality, group_size, noise_std)
    return RouterOutput(*_top1_router(x, w, noise, modality, group_size, num_modalities, noise_std)[:NUM_OUTPUTS])
