"""The sparse MLP: a top-1 mixture of experts with capacity and Batch Priority Routing.

One call routes all tokens of a batch (image patches and caption tokens together, each tagged with
its modality) in groups. The compute is five ops from `kernels` — router, slot assignment,
dispatch, expert FFN, combine — so the Triton and PyTorch backends compute the same function.
With expert parallelism the expert-major buffer travels to the experts' ranks and back by
all-to-all; routing, capacity and BPR stay on the rank that owns the tokens.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Mapping, Optional

import deepspeed.moe.layer
import torch
import torch.nn.functional as F
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import logger as ds_logger
from torch import Tensor, nn

import limoe_kernels
from limoe_kernels.dispatch import expert_major_rows
from limoe_kernels.router import RouterOutput
from limoe.config import MoeConfig
from limoe.distributed import ExpertSharding, experts_all_to_all, experts_all_to_all_back
from limoe.errors import LimoeError
from limoe.model.layers import Mlp
from limoe.model.aux_losses import importance_loss, load_loss, modality_entropies, router_z_loss
from limoe.model.routing import (
    NUM_MODALITIES,
    PADDING,
    Grouping,
    LayerRouting,
    expert_capacity,
    router_noise,
)


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` is Triton on CUDA and the PyTorch reference elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (the expert matmuls then run in bf16), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed logs a line per MoE layer it builds; a model build should not."""
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ds_logger.setLevel(level)


class MoeMlp(deepspeed.moe.layer.MoE):
    """Top-1 MoE replacing a block's MLP; each expert is a d → h → d GELU MLP.

    It is a DeepSpeed `MoE` so the engine knows it: the experts live in DeepSpeed's `Experts`
    container, whose parameters are marked `allreduce=False` with the group `ep_size_{ep}`; the
    engine then reduces their gradients over the expert-data-parallel group only, clips with
    the right global norm and saves them as expert shards. The router is DeepSpeed's gate
    weight `wg` (no bias); DeepSpeed's own routing and forward are not used — this layer routes
    with capacity per group, Batch Priority Routing and the LIMoE statistics.
    Each rank holds E / ep experts; `set_deepspeed_parallelism` (called by the engine) fetches
    the expert-parallel group used for the all-to-all.
    """

    def __init__(self, width: int, hidden: int, config: MoeConfig, sharding: ExpertSharding = ExpertSharding()):
        if config.num_experts % sharding.size:
            raise LimoeError(
                f"model.moe.num_experts {config.num_experts} is not divisible by "
                f"distributed.expert_parallel_size {sharding.size}."
            )
        with _quiet_deepspeed():
            super().__init__(width, Mlp(width, hidden), num_experts=config.num_experts,
                             ep_size=sharding.size, k=1, use_rts=False)
        self.config = config
        self.sharding = sharding
        self.expert_group = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform experts with zero biases, router N(0, 0.02).

        Expert e draws from its own generator seeded by (layer seed, global index e), and the
        layer seed from the global RNG, so a model sharded over ep ranks starts from exactly
        the weights of the unsharded one, and the global RNG advances the same either way.
        """
        if self.router_weight.is_meta:  # shapes only (parameter counting): nothing to draw
            return
        layer_seed = int(torch.randint(2**62, ()))
        for local_index, expert in enumerate(self.experts):
            generator = torch.Generator().manual_seed(layer_seed + self.sharding.global_index(local_index, self.num_local_experts))
            for linear in (expert.fc1, expert.fc2):
                weight = torch.empty(linear.weight.shape)
                nn.init.xavier_uniform_(weight, generator=generator)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    linear.bias.zero_()
        nn.init.normal_(self.router_weight, std=0.02)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        if self.ep_size > 1:
            self.expert_group = ds_groups._get_expert_parallel_group(self.expert_group_name)

    @property
    def router_weight(self) -> nn.Parameter:
        return self.deepspeed_moe.gate.wg.weight  # [E, d]

    @property
    def experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts  # E_local × Mlp

    def stacked_expert_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """w_in [E_l, d, h], b_in [E_l, h], w_out [E_l, h, d], b_out [E_l, d] in `dtype`, for the batched FFN.

        DeepSpeed keeps one module per expert, so the weights are stacked on every call; each one
        is cast first, so under bf16 autocast the copy is made in bf16, not in fp32 and again in bf16.
        """

        def stack(tensors) -> Tensor:
            return torch.stack([t.to(dtype) for t in tensors])

        w_in = stack(e.fc1.weight for e in self.experts).transpose(1, 2)
        b_in = stack(e.fc1.bias for e in self.experts)
        w_out = stack(e.fc2.weight for e in self.experts).transpose(1, 2)
        b_out = stack(e.fc2.bias for e in self.experts)
        return w_in, b_in, w_out, b_out

    @property
    def capacity_factor(self) -> Optional[float]:
        """The train factor in training mode, else the eval one (None: dropless)."""
        return self.config.train_capacity_factor if self.training else self.config.eval_capacity_factor

    def forward(self, x: Tensor, modality: Tensor) -> tuple[Tensor, LayerRouting]:
        """x [B, N, d], modality [B, N] (0 image, 1 text, −1 padding) → y [B, N, d], routing.

        A dropped or padding token gets exactly zero here and keeps its residual stream.
        """
        batch, tokens, width = x.shape
        ops = limoe_kernels.get_ops(resolve_backend(self.config.backend, x.device))
        grouping = Grouping.for_batch(batch, self.config.group_size)
        modality = grouping.group(modality, PADDING)  # [G, S]
        groups, size = modality.shape
        flat = grouping.group(x, 0.0).reshape(groups * size, width).to(_compute_dtype(x))  # [G·S, d]

        with torch.autocast(x.device.type, enabled=False):  # routing decisions and sums in fp32
            router = self._route(ops, flat, modality)
        expert = router.expert.view(groups, size)  # [G, S], −1 for padding
        capacity = expert_capacity(size, self.num_experts, self.capacity_factor)
        slot = ops.assign_slots(expert, router.gate.view(groups, size), self.num_experts, capacity,
                                self.config.batch_priority)  # [G, S]
        row = expert_major_rows(expert, slot, capacity)  # [G·S]

        buffer = ops.dispatch(flat, row, self.num_experts * groups * capacity)  # [E·G·C, d]
        buffer = buffer.view(self.num_experts, groups * capacity, width)
        expert_out = self._run_experts(ops, buffer).reshape(-1, width)  # [E·G·C, d]
        y = ops.combine(expert_out, row, router.gate.to(flat.dtype))  # [G·S, d]

        with torch.autocast(x.device.type, enabled=False):  # counts and losses in fp32
            routing = self._routing_record(router, modality, expert, slot, grouping, tokens, capacity)
        return grouping.ungroup(y.view(groups, size, width), tokens), routing

    def _route(self, ops, flat: Tensor, modality: Tensor) -> RouterOutput:
        """Router logits in fp32 (noisy in training) → per-token choice and per-(group, modality) sums.

        flat [G·S, d], modality [G, S]. The router gives padding tokens expert −1 and gate 0: they
        take no slot and count in no statistic.
        """
        logits = F.linear(flat.float(), self.router_weight.float())  # [G·S, E]
        noise = router_noise(logits, self.num_experts) if self.training and self.config.router_noise else None
        return ops.top1_router(logits, noise, modality.reshape(-1), modality.shape[1], NUM_MODALITIES,
                               1.0 / self.num_experts)

    def _run_experts(self, ops, buffer: Tensor) -> Tensor:
        """Expert FFN on [E, G·C, d]; with expert parallelism, on the local experts' slots of all ranks."""
        weights = self.stacked_expert_weights(buffer.dtype)
        if self.expert_group is None:
            return ops.expert_ffn(buffer, *weights)
        local = experts_all_to_all(buffer, self.expert_group)  # [E_local, ep·G·C, d]
        local = ops.expert_ffn(local, *weights)
        return experts_all_to_all_back(local, self.expert_group)  # [E, G·C, d]

    def _routing_record(self, router: RouterOutput, modality, expert, slot, grouping, tokens, capacity) -> LayerRouting:
        """Auxiliary-loss inputs and statistics for this call, from the router's sums [G, M, ·]
        and the choices expert, slot [G, S]."""
        masks = torch.stack([modality == m for m in range(NUM_MODALITIES)]).to(router.probs.dtype)  # [M, G, S]
        counts = masks.sum(dim=-1).T  # [G, M]
        token_entropy, marginal_entropy, present = modality_entropies(router.prob_sum, router.entropy_sum, counts)
        chosen = F.one_hot(expert.clamp(min=0), self.num_experts).to(masks.dtype)  # [G, S, E]
        return LayerRouting(
            importance=importance_loss(router.prob_sum),
            load=load_loss(router.load_sum, counts),
            z=router_z_loss(router.z_sum, counts),
            token_entropy=token_entropy,
            marginal_entropy=marginal_entropy,
            present=present,
            routed=torch.einsum("mgs,gse->me", masks, chosen),
            kept=torch.einsum("mgs,gse->me", masks * (slot >= 0), chosen),
            prob_sum=router.prob_sum.detach().sum(dim=0),
            entropy_sum=router.entropy_sum.detach().sum(dim=0),
            expert=grouping.ungroup(expert, tokens),
            kept_mask=grouping.ungroup(slot >= 0, tokens),
            capacity=capacity,
            num_groups=expert.shape[0],
        )


# ---------------------------------------------------------------------------------------------
# Experts in checkpoints: the one place that knows how a rank's experts map to the unsharded layer

_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"  # the expert ModuleList's path inside MoeMlp


def expert_checkpoint_entries(layer: MoeMlp, tensor_of: Callable[[nn.Parameter], Tensor]) -> dict[str, Tensor]:
    """This rank's experts as checkpoint entries that do not depend on how experts are sharded.

    `tensor_of(parameter)` gives what to store for one of this rank's expert parameters (its
    value, an optimizer moment of its shape, or its optimizer step); the returned keys are that tensor's names in the
    unsharded layer, relative to the layer (`deepspeed_moe.experts.deepspeed_experts.5.fc1.weight`
    for global expert 5), so the entries of all expert-parallel ranks together are the same for
    any expert-parallel size. `tensor_of` is called for every expert parameter in the same order
    on every rank (it may be a collective).
    """
    entries = {}
    for local_index, expert in enumerate(layer.experts):
        global_index = layer.sharding.global_index(local_index, layer.num_local_experts)
        for name, parameter in expert.named_parameters():
            entries[f"{_EXPERTS}.{global_index}.{name}"] = tensor_of(parameter)
    return entries


def restore_expert_entries(layer: MoeMlp, entries: Mapping[str, Tensor],
                           put: Callable[[nn.Parameter, Tensor], None]) -> None:
    """The reverse of `expert_checkpoint_entries`: `put(parameter, tensor)` for each of this rank's
    expert parameters, the tensor taken from `entries` (keyed as in the unsharded layer, so written
    by any number of ranks); a missing entry raises what `entries` raises for a missing key."""
    for local_index, expert in enumerate(layer.experts):
        global_index = layer.sharding.global_index(local_index, layer.num_local_experts)
        for name, parameter in expert.named_parameters():
            put(parameter, entries[f"{_EXPERTS}.{global_index}.{name}"])
