"""The whole top-1 MoE layer as one op: route, assign slots, run the kept tokens through their
experts, and add the gate-scaled result back at the tokens' places.

Math: with the router's expert k(t) and gate g(t) for token t (see `router`), its slot under
capacity and priority (see `slots`), and kept(t) whether it got one,
    y[t] = kept(t) · g(t) · (GELU(x[t] · w_in[k]ᵀ + b_in[k]) · w_out[k]ᵀ + b_out[k])
and the router's loss terms and statistics. Gradients reach x (through the experts and the
router), the router weight (through the gate and the loss terms) and every expert weight.

The reference composes the reference ops through the capacity-padded expert-major buffer
(dispatch, two batched matmuls over every slot, combine). The Triton op never builds that
buffer: the first grouped GEMM gathers the kept tokens' rows of x in its prologue, the second
scales by the gate and scatters to y in its epilogue (and writes zeros for the tokens no expert
kept). Its backward writes dx once, from one kernel that adds the router's gradient dℓ·W_router
to the experts' in its epilogue, and the gate's gradient comes out of the second GEMM's backward
in column-tile parts that the router's backward kernel adds up. That is why the layer is one op:
autograd would otherwise add two full-size dx tensors. Launches: forward router + finish, sort
(BPR), counts + slots, two GEMMs; backward four GEMMs, the router kernel and one reduction.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._launch import check_device, check_float
from .combine import combine_reference
from .dispatch import dispatch_reference, expert_major_rows
from .expert_ffn import check_expert_weights, expert_ffn_reference
from .grouped_gemm import Segments, down_backward, down_projection, up_backward, up_projection, weight_grad
from .router import (
    NUM_OUTPUTS, LossGrads, RouterOutput, RouterState, _layout, fake_router_outputs, router_backward, router_forward,
    top1_router_reference,
)
from .slots import SlotPlan, assign_slots_reference, fake_plan, plan_slots


class MoeLayerOutput(NamedTuple):
    y: Tensor  # [T, d] in x's dtype; exactly 0 for tokens no expert kept
    router: RouterOutput  # choices, loss terms and statistics
    slot: Tensor  # [G, S] int64 slot within (group, expert), −1 = not kept
    kept: Tensor  # [M, E] fp32 kept tokens per modality and expert


def moe_layer_reference(
    x: Tensor, w_router: Tensor, noise: Optional[Tensor], modality: Optional[Tensor], w_in: Tensor, b_in: Tensor,
    w_out: Tensor, b_out: Tensor, group_size: Optional[int] = None, num_modalities: int = 1,
    noise_std: Optional[float] = None, capacity: int = 0, batch_priority: bool = True,
) -> MoeLayerOutput:
    """Plain PyTorch: x [T, d], w_router [E, d], noise [T, E], modality [T] (−1 padding),
    w_in [E, h, d], b_in [E, h], w_out [E, d, h], b_out [E, d] → MoeLayerOutput."""
    tokens, d = x.shape
    num_experts = w_router.shape[0]
    modality, group_size, noise_std = _layout(tokens, num_experts, x.device, modality, group_size, noise_std)
    groups = tokens // group_size
    router = top1_router_reference(x, w_router, noise, modality, group_size, num_modalities, noise_std)
    expert = router.expert.view(groups, group_size)  # [G, S]
    plan = assign_slots_reference(expert, router.gate.view(groups, group_size), modality.view(groups, group_size),
                                  num_experts, capacity, batch_priority, num_modalities)
    row = expert_major_rows(expert, plan.slot, capacity)  # [T]
    num_rows = num_experts * groups * capacity
    buf = dispatch_reference(x, row, num_rows).view(num_experts, groups * capacity, d)
    out = expert_ffn_reference(buf, plan.segment_count[:num_experts, None], w_in, b_in, w_out, b_out)
    return MoeLayerOutput(combine_reference(out.view(num_rows, d), row, router.gate), router, plan.slot, plan.kept)


# ---------------------------------------------------------------------------------------------
# The fused op
# ---------------------------------------------------------------------------------------------

NUM_PLAN = len(SlotPlan._fields)
NUM_STATE = len(RouterState._fields)
LayerTensors = tuple[(Tensor,) * (1 + NUM_OUTPUTS + NUM_PLAN + NUM_STATE + 2)]  # y, router, plan, state, z, act


def _split(tensors) -> tuple[Tensor, RouterOutput, SlotPlan, RouterState, Tensor, Tensor]:
    """The fused op's flat result → (y, router, plan, router state, z, act)."""
    y, rest = tensors[0], tensors[1:]
    router, rest = RouterOutput(*rest[:NUM_OUTPUTS]), rest[NUM_OUTPUTS:]
    plan, rest = SlotPlan(*rest[:NUM_PLAN]), rest[NUM_PLAN:]
    state, (z, act) = RouterState(*rest[:NUM_STATE]), rest[NUM_STATE:]
    return y, router, plan, state, z, act


def _segments(plan: SlotPlan) -> Segments:
    """One segment per expert, then the tail of tokens no expert kept."""
    return Segments(plan.segment_start, plan.segment_count, 1, plan.segment_start.shape[0] - 1)


@torch.library.custom_op("limoe_kernels::moe_layer", mutates_args=())
def _moe_layer(
    x: Tensor, w_router: Tensor, noise: Optional[Tensor], modality: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor,
    b_out: Tensor, group_size: int, num_modalities: int, noise_std: float, capacity: int, batch_priority: bool,
) -> LayerTensors:
    tokens, d = x.shape
    num_experts = w_router.shape[0]
    check_float("moe_layer", "x", x)
    check_expert_weights("moe_layer", num_experts, d, x.dtype, w_in, b_in, w_out, b_out)
    check_device("moe_layer", x, w_in, b_in, w_out, b_out)
    router, state = router_forward(x, w_router, noise, modality, group_size, num_modalities, noise_std)
    groups = tokens // group_size
    plan = plan_slots(router.expert.view(groups, group_size), router.gate.view(groups, group_size),
                      modality.view(groups, group_size), num_experts, capacity, batch_priority, num_modalities)
    segments = _segments(plan)
    z, act = up_projection(x, plan.token_of_row, segments, tokens, w_in, b_in)  # [T, h], kept rows only
    y = down_projection(act, segments, w_out, b_out, scatter=(plan.token_of_row, router.gate))  # [T, d]
    return (y, *router, *plan, *state, z, act)


@_moe_layer.register_fake
def _(x, w_router, noise, modality, w_in, b_in, w_out, b_out, group_size, num_modalities, noise_std, capacity,
      batch_priority):
    tokens, hidden = x.shape[0], w_in.shape[1]
    expert = x.new_empty(tokens // group_size, group_size, dtype=torch.int64)
    router = fake_router_outputs(x, w_router, group_size, num_modalities)  # RouterOutput, then RouterState
    return (torch.empty_like(x), *router[:NUM_OUTPUTS], *fake_plan(expert, w_router.shape[0], num_modalities),
            *router[NUM_OUTPUTS:], x.new_empty(tokens, hidden), x.new_empty(tokens, hidden))


@torch.library.custom_op("limoe_kernels::moe_layer_backward", mutates_args=())
def _moe_layer_backward(
    x: Tensor, w_router: Tensor, noise: Optional[Tensor], modality: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor,
    b_out: Tensor, group_size: int, noise_std: float, saved: list[Tensor], dy: Tensor, d_importance: Tensor,
    d_load: Tensor, d_z: Tensor, d_token_entropy: Tensor, d_marginal: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernels as an op of their own, so torch.compile can trace the backward graph."""
    _, router, plan, state, z, act = _split([dy, *saved])
    segments = _segments(plan)
    dy = dy.contiguous()
    dz, dgate_parts = down_backward(dy, segments, w_out, b_out, z, act, gather=(plan.token_of_row, router.gate))
    dw_out, db_out = weight_grad(dy, act, segments, a_index=plan.token_of_row, a_scale=router.gate)
    grads = LossGrads(d_importance, d_load, d_z, d_token_entropy, d_marginal)
    dlogits, dw_router = router_backward(x, w_router, noise, modality, group_size, noise_std, router, state,
                                         plan.slot.view(-1), dgate_parts, grads, write_dx=False)
    dx = up_backward(dz, segments, w_in, scatter=(plan.token_of_row, dlogits, w_router))
    dw_in, db_in = weight_grad(dz, x, segments, b_index=plan.token_of_row)
    return dx, dw_router.to(w_router.dtype), dw_in, db_in, dw_out, db_out


@_moe_layer_backward.register_fake
def _(x, w_router, noise, modality, w_in, b_in, w_out, b_out, *rest):
    return tuple(torch.empty_like(t) for t in (x, w_router, w_in, b_in, w_out, b_out))


def _setup_context(ctx, inputs, output) -> None:
    x, w_router, noise, modality, w_in, b_in, w_out, b_out, ctx.group_size, _, ctx.noise_std, _, _ = inputs
    ctx.has_noise = noise is not None
    ctx.set_materialize_grads(False)
    _, router, plan, state, z, act = _split(output)
    ctx.mark_non_differentiable(router.gate, router.routed, router.prob_sum, router.entropy_sum, plan.kept, *state,
                                z, act)
    ctx.save_for_backward(x, w_router, modality, w_in, b_in, w_out, b_out, *output[1:],
                          *([noise] if ctx.has_noise else []))


def _backward(ctx, dy, *grads):
    x, w_router, modality, w_in, b_in, w_out, b_out, *rest = ctx.saved_tensors
    saved, noise = rest[:len(grads)], rest[len(grads):]
    router = RouterOutput(*saved[:NUM_OUTPUTS])
    named = dict(zip(RouterOutput._fields, grads[:NUM_OUTPUTS]))
    if dy is None:
        dy = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    dx, dw_router, dw_in, db_in, dw_out, db_out = _moe_layer_backward(
        x, w_router, noise[0] if ctx.has_noise else None, modality, w_in, b_in, w_out, b_out, ctx.group_size,
        ctx.noise_std, list(saved), dy, *LossGrads.of(named, router),
    )
    return dx, dw_router, None, None, dw_in, db_in, dw_out, db_out, None, None, None, None, None


_moe_layer.register_autograd(_backward, setup_context=_setup_context)


def moe_layer(
    x: Tensor, w_router: Tensor, noise: Optional[Tensor], modality: Optional[Tensor], w_in: Tensor, b_in: Tensor,
    w_out: Tensor, b_out: Tensor, group_size: Optional[int] = None, num_modalities: int = 1,
    noise_std: Optional[float] = None, capacity: int = 0, batch_priority: bool = True,
) -> MoeLayerOutput:
    """Triton: the same function as `moe_layer_reference`, without the padded buffer. The gate is
    returned for inspection only (its gradient flows inside the op)."""
    modality, group_size, noise_std = _layout(x.shape[0], w_router.shape[0], x.device, modality, group_size, noise_std)
    y, router, plan, _, _, _ = _split(_moe_layer(x, w_router, noise, modality, w_in, b_in, w_out, b_out, group_size,
                                                 num_modalities, noise_std, capacity, batch_priority))
    return MoeLayerOutput(y, router, plan.slot, plan.kept)
