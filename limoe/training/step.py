"""The mechanics of one optimizer step: micro-batches by feature caching, forward and backward,
global-norm clipping and the update, exact at any micro-batch size. What is optimised is the
objective's (`limoe.training.objectives`), which is the module the engine wraps.

The contrastive loss couples every pair of the global batch, so a per-GPU batch that does not
fit in memory cannot simply be split into micro-batches whose losses are added. It is split by
feature caching (GradCache; open_clip's `--accum-freq`):

1. encode every micro-batch without gradient, remembering the RNG state before each;
2. compute the contrastive loss on the cached features of the whole batch (gathered over ranks
   as usual) and its gradient with respect to each pair's features and the loss's own
   parameters (logit scale, SigLIP bias);
3. encode each micro-batch again with gradient, from its remembered RNG state (the same router
   noise, hence the same routing and the same features), and back-propagate the cached feature
   gradients through it, plus its share of the auxiliary losses.

The parameter gradient is then the full batch's, up to summation order; the cost is one extra
forward without gradient. A micro-batch must hold whole routing groups, so that it routes
exactly as the full batch does. The micro-batches mark DeepSpeed's gradient-accumulation boundary
(so ZeRO reduces as it would for any accumulation), and the step happens once, after the last one.

Co-training (`limoe.training.cotraining`) builds its step from the same pieces: a contrastive
task's batch goes through `forward_backward` (pairs of the task's modalities, image–text or
audio–text: the feature cache holds each side's features), a classification task's through
`whole_batch_backward`, each scaled by the task's loss weight; under the accumulating schedule only
the last task's backward marks the boundary, so the tasks' gradients are summed before one update.

With FLIP's patch dropping (`limoe.training.flip`, images' or audio clips') the kept patches are
drawn once per step for the whole batch and each micro-batch encodes its own rows of them, in both
of its forwards.

The engine may also wrap another objective (`limoe pretrain`'s masked modelling): anything called
as `objective(images, tokens, step)` → `ObjectiveOutput`, whose loss is a sum over examples, so it
needs no feature cache and is stepped over the whole per-GPU batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.torch_autocast import autocast_if_enabled
from torch import Tensor, nn
from torch.nn.utils import get_total_norm

from limoe.config import Config
from limoe.distributed import expert_parallel_group
from limoe.modalities import DEFAULT_MODALITIES
from limoe.model.routing import LayerRouting
from limoe.training.batches import micro_batch_size
from limoe.training.deepspeed_config import zero_clips_by_itself
from limoe.training.losses import RoutingCounts, auxiliary_loss, whole_batch_counts


@dataclass
class MicroBatchShare:
    """What one micro-batch's forward needs to produce its share of the whole batch's gradient."""

    # ([m, D], [m, D]) d(contrastive loss)/d(features) of these pairs' two sides (images or audio, then
    # captions), from the cached features
    feature_grads: tuple[Tensor, Tensor]
    whole_batch: list[RoutingCounts]  # per MoE layer: what the auxiliary losses average over
    loss_parameter_grads: list[Tensor]  # d(contrastive loss)/d(logit scale, bias); given to one micro-batch only
    keep: Optional[Tensor]  # [m, K] the patches these images or clips keep (FLIP), None: all of them


@dataclass
class StepOutcome:
    """What one optimizer step did, for the training loop and its reporter."""

    terms: dict[str, Tensor]
    stepped: bool
    samples: int  # over all ranks
    # per forward pass of the step: (the co-training task it ran, None outside co-training; its MoE layers' routing)
    routing: list[tuple[Optional[str], list[LayerRouting]]]
    task_samples: dict[str, int] = field(default_factory=dict)  # co-training: samples of each task run, all ranks


def detached(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loss terms for reporting: cut from the graph, in float32."""
    return {k: v.detach().float() for k, v in terms.items()}


# ---------------------------------------------------------------------------------------------
# Micro-batches


def _rng_state(device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Optional[Tensor]], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _feature_cache_backward(engine, inputs: Tensor, tokens: Tensor, config: Config, micro: int, step: int,
                            weight: float, last: bool, modalities: Optional[tuple[str, str]]
                            ) -> tuple[dict[str, Tensor], list[LayerRouting], bool]:
    """Steps 1–3 of the module docstring; backward runs only if the loss is finite (or skipping is off)."""
    module = engine.module  # a ContrastiveObjective (limoe.training.objectives)
    device = inputs.device
    first, second = modalities or DEFAULT_MODALITIES
    keep = module.patch_keep(inputs, step, first)  # [B_local, K] or None
    keeps = keep.split(micro) if keep is not None else [None] * (inputs.shape[0] // micro)
    chunks = list(zip(inputs.split(micro), tokens.split(micro), keeps))
    states, first_features, second_features, routings = [], [], [], []
    with torch.no_grad(), autocast_if_enabled(engine):
        for chunk_inputs, chunk_tokens, chunk_keep in chunks:
            states.append(_rng_state(device))
            features, chunk_routing = module.features({first: chunk_inputs, second: chunk_tokens}, chunk_keep, first)
            first_features.append(features[first])  # [m, D]
            second_features.append(features[second])
            routings.append(chunk_routing)
    after = _rng_state(device)
    whole = whole_batch_counts(routings)

    cached_first = torch.cat(first_features).requires_grad_()  # [B_local, D]
    cached_second = torch.cat(second_features).requires_grad_()
    with autocast_if_enabled(engine):
        contrastive = module.contrastive_loss(cached_first, cached_second)
    first_grad, second_grad, *parameter_grads = torch.autograd.grad(
        contrastive, [cached_first, cached_second, *module.loss_parameters()])
    with torch.no_grad():
        shares = [auxiliary_loss(r, config.loss, device, whole) for r in routings]
        parts = {name: sum(share[1][name] for share in shares) for name in shares[0][1]}
        aux = sum(share[0] for share in shares)
        loss = contrastive.detach() + aux
        terms = detached({"loss": loss, "contrastive": contrastive, "auxiliary": aux, **parts,
                           **module.logged_parameters()})
    routing = [LayerRouting.merge(layer) for layer in zip(*routings)]  # per MoE layer, the whole batch's
    if config.train.skip_nonfinite_steps and not _finite_everywhere(loss):
        return terms, routing, False

    for index, (chunk_inputs, chunk_tokens, chunk_keep) in enumerate(chunks):
        _set_rng_state(states[index], device)
        pairs = slice(index * micro, (index + 1) * micro)
        share = MicroBatchShare((first_grad[pairs], second_grad[pairs]), whole,
                                parameter_grads if index == 0 else [], chunk_keep)
        engine.set_gradient_accumulation_boundary(last and index == len(chunks) - 1)
        objective, _, _ = engine(chunk_inputs, chunk_tokens, step, share=share, **_pair_keywords(modalities))
        engine.backward(_weighted(objective, weight), scale_wrt_gas=False)
    _set_rng_state(after, device)
    return terms, routing, True


# ---------------------------------------------------------------------------------------------
# Forward, backward, clipping, update


def forward_backward(engine, inputs: Tensor, tokens: Tensor, config: Config, step: int = 0, weight: float = 1.0,
                     last: bool = True,
                     modalities: Optional[tuple[str, str]] = None) -> tuple[dict[str, Tensor], list, bool]:
    """This rank's gradient of the batch's loss at 0-based `step`, times `weight`, added to the
    gradients already there; `last`: no other backward follows before the update (DeepSpeed reduces
    over ranks then). `modalities`: what the pairs are (a co-training task's, e.g. audio–text);
    None: the objective's own (image–text). Returns the loss terms, the routing, and False if the
    step is to be skipped (a non-finite loss with skip_nonfinite_steps)."""
    micro = micro_batch_size(config, dist.get_world_size())
    if micro < inputs.shape[0]:
        return _feature_cache_backward(engine, inputs, tokens, config, micro, step, weight, last, modalities)
    return whole_batch_backward(engine, (inputs, tokens, step), config, weight, last, _pair_keywords(modalities))


def _pair_keywords(modalities: Optional[tuple[str, str]]) -> dict:
    """The objective's keyword naming the pair's modalities; none for the objective's own (an
    objective without pairs of several kinds, masked pretraining, takes no such keyword)."""
    return {} if modalities is None else {"modalities": modalities}


def whole_batch_backward(engine, inputs: tuple, config: Config, weight: float = 1.0, last: bool = True,
                         keywords: Optional[dict] = None) -> tuple[dict[str, Tensor], list, bool]:
    """`forward_backward` of one forward `engine(*inputs, **keywords)` (a batch taken whole)."""
    engine.set_gradient_accumulation_boundary(last)
    loss, terms, routing = engine(*inputs, **(keywords or {}))
    if config.train.skip_nonfinite_steps and not _finite_everywhere(loss):
        return terms, routing, False
    engine.backward(_weighted(loss, weight), scale_wrt_gas=False)
    return terms, routing, True


def _weighted(loss: Tensor, weight: float) -> Tensor:
    return loss if weight == 1.0 else loss * weight


def global_grad_norm(module: nn.Module, expert_group) -> Tensor:
    """The 2-norm of the whole model's gradient, every expert counted once.

    After DeepSpeed's reduction the shared gradients are equal on all ranks, while each
    expert-parallel rank holds the gradients of its own experts; so the squared expert norms
    are summed over the expert-parallel group and added to the shared part once. (DeepSpeed's
    own clipping averages the per-rank norms, which is not the global norm with experts sharded.)
    """
    shared, experts = [], []
    for parameter in module.parameters():
        if parameter.grad is not None:
            (experts if is_moe_param(parameter) else shared).append(parameter.grad.detach())
    device = next(module.parameters()).device
    shared_squared = get_total_norm(shared).to(device).pow(2) if shared else torch.zeros((), device=device)
    experts_squared = get_total_norm(experts).to(device).pow(2) if experts else torch.zeros((), device=device)
    if expert_group is not None:
        dist.all_reduce(experts_squared, group=expert_group)
    return (shared_squared + experts_squared).sqrt()


def clip_gradients(engine, max_norm: float, expert_group) -> Tensor:
    """Scale all gradients so their global norm is at most `max_norm`; returns the norm before."""
    norm = global_grad_norm(engine.module, expert_group)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(engine.module.parameters(), max_norm, norm)
    return norm


def apply_update(engine, terms: dict[str, Tensor], config: Config) -> None:
    """Clip by the global norm and take the optimizer step; records the norm before clipping in `terms`.

    Without ZeRO the gradients are whole on every rank and limoe clips them; ZeRO holds them in
    partitions and clips them itself, inside its step.
    """
    if not zero_clips_by_itself(config):
        terms["grad_norm"] = clip_gradients(engine, config.optim.grad_clip, expert_parallel_group(config))
    engine.step()
    if zero_clips_by_itself(config):
        terms["grad_norm"] = torch.as_tensor(engine.get_global_grad_norm()).float()
    engine.module.clamp_temperatures()


def _finite_everywhere(loss: Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks must agree to skip a step together).

    Reading the answer is a host sync, paid every step in skip_nonfinite_steps mode only.
    """
    finite = torch.isfinite(loss).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_step(engine, images: Tensor, tokens: Tensor, config: Config,
               step: int = 0) -> tuple[dict[str, Tensor], list, bool]:
    """Forward, backward, clip, optimizer step; returns the loss terms, the routing, and whether it stepped.

    `step` (0-based, the updates so far) picks what the objective does: its stage and masks. No host sync, except in skip_nonfinite_steps mode (the loss is checked before the update).
    """
    terms, routing, finite = forward_backward(engine, images, tokens, config, step)
    if not finite:
        engine.zero_grad()
        return terms, routing, False
    apply_update(engine, terms, config)
    return terms, routing, True
