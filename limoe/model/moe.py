"""The sparse MLP: a top-1 mixture of experts with capacity and Batch Priority Routing.

One call routes all tokens of a batch (image patches and caption tokens together, each tagged with
its modality) in groups. In one process the whole layer is one op from `limoe_kernels`
(`moe_layer`: router, slots, and grouped GEMMs over the kept tokens only), so the Triton and
PyTorch backends compute the same function. With expert parallelism the layer is composed of the
ops instead: the kept rows travel to the experts' ranks and back by all-to-all, while routing,
capacity and BPR stay on the rank that owns the tokens.

Parameters (Linear layout, experts stacked; E_l = E / expert-parallel size local experts):
    router_weight [E, d]      fc1_weight [E_l, h, d]   fc1_bias [E_l, h]
                              fc2_weight [E_l, d, h]   fc2_bias [E_l, d]
Local expert i is global expert ep_rank · E_l + i, so an unsharded tensor is the ranks' tensors
concatenated in expert-parallel rank order (`local_experts_of` cuts a rank's rows from it). How
checkpoints name the experts is `limoe.checkpoints.expert_entries`'s business.
"""

from __future__ import annotations

import math
from typing import Optional

import deepspeed.moe.layer
import torch
from deepspeed.utils import groups as ds_groups
from torch import Tensor, nn

import limoe_kernels
from limoe_kernels.layer import MoeLayerOutput
from limoe.config import MoeConfig
from limoe.distributed import (
    ExpertSharding,
    experts_all_to_all,
    experts_all_to_all_back,
    experts_all_to_all_counts,
)
from limoe.errors import LimoeError
from limoe.modalities import DEFAULT_MODALITIES, PADDING
from limoe.model.routing import Grouping, LayerRouting, expert_capacity

EXPERT_PARAMETERS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")  # stacked over local experts
LECUN_TRUNCATION = 0.87962566103423978  # std of N(0, 1) truncated to ±2: flax's lecun_normal divides by it


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` is Triton on CUDA and the PyTorch reference elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (the expert matmuls then run in bf16), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class MoeMlp(deepspeed.moe.layer.MoE):
    """Top-1 MoE replacing a block's MLP; each expert is a d → h → d GELU MLP.

    It is a DeepSpeed `MoE` so the engine knows it: `has_moe_layers` looks for that class, and
    the expert parameters carry DeepSpeed's marking (`allreduce=False`, `group_name` =
    `ep_size_{ep}`), so the engine reduces their gradients over the expert-data-parallel group
    only, global-norm clipping counts them once, and the optimizer groups split them out. Only
    nn.Module's constructor runs: DeepSpeed's would build one module per expert and its own gate,
    which this layer replaces with stacked weights and its own routing (capacity per group, Batch
    Priority Routing, the LIMoE statistics); the attributes the engine reads are set here.
    `set_deepspeed_parallelism` (called by the engine) creates and fetches the expert-parallel
    group used for the all-to-all.
    """

    def __init__(self, width: int, hidden: int, config: MoeConfig, sharding: ExpertSharding = ExpertSharding(),
                 num_modalities: int = len(DEFAULT_MODALITIES)):
        if config.num_experts % sharding.size:
            raise LimoeError(
                f"model.moe.num_experts {config.num_experts} is not divisible by "
                f"distributed.expert_parallel_size {sharding.size}."
            )
        nn.Module.__init__(self)
        # What DeepSpeed's engine, checkpointing and profiler read from an MoE layer:
        self.num_experts = config.num_experts
        self.ep_size = sharding.size
        self.num_local_experts = config.num_experts // sharding.size
        self.expert_group_name = f"ep_size_{sharding.size}"
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.config = config
        self.sharding = sharding
        self.num_modalities = num_modalities  # M: the model's modalities, the rows of its routing statistics
        self.expert_group = None
        local = self.num_local_experts
        self.router_weight = nn.Parameter(torch.empty(config.num_experts, width))  # [E, d]
        self.fc1_weight = nn.Parameter(torch.empty(local, hidden, width))  # [E_l, h, d]
        self.fc1_bias = nn.Parameter(torch.empty(local, hidden))  # [E_l, h]
        self.fc2_weight = nn.Parameter(torch.empty(local, width, hidden))  # [E_l, d, h]
        self.fc2_bias = nn.Parameter(torch.empty(local, width))  # [E_l, d]
        for parameter in self.expert_parameters():
            parameter.allreduce = False
            parameter.group_name = self.expert_group_name
        self.reset_parameters()

    def expert_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in EXPERT_PARAMETERS]

    def local_experts_of(self, unsharded: Tensor) -> Tensor:
        """This rank's rows [E_l, ...] of a stacked expert tensor of the unsharded layer [E, ...]."""
        first = self.sharding.global_index(0, self.num_local_experts)
        return unsharded[first: first + self.num_local_experts]

    def reset_parameters(self) -> None:
        """Xavier-uniform experts with zero biases; the router lecun-normal (flax `nn.Dense`'s default).

        With `expert_init: shared` (V-MoE's `split_rngs = False`) every expert of the layer starts
        from the same draw; with `independent` expert e draws from its own generator seeded by
        (layer seed, global index e). The layer seed comes from the global RNG, so a model sharded
        over ep ranks starts from exactly the weights of the unsharded one, and the global RNG
        advances the same either way.
        """
        if self.router_weight.is_meta:  # shapes only (parameter counting): nothing to draw
            return
        layer_seed = int(torch.randint(2**62, ()))
        for local_index in range(self.num_local_experts):
            index = self.sharding.global_index(local_index, self.num_local_experts)
            generator = torch.Generator().manual_seed(layer_seed + (index if self.config.expert_init == "independent" else 0))
            with torch.no_grad():
                for weight in (self.fc1_weight, self.fc2_weight):
                    draw = torch.empty(weight.shape[1:])
                    nn.init.xavier_uniform_(draw, generator=generator)
                    weight[local_index].copy_(draw)
        nn.init.zeros_(self.fc1_bias)
        nn.init.zeros_(self.fc2_bias)
        std = math.sqrt(1.0 / self.router_weight.shape[1]) / LECUN_TRUNCATION
        nn.init.trunc_normal_(self.router_weight, std=std, a=-2 * std, b=2 * std)

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's engine calls this through `set_deepspeed_parallelism`: create the expert
        and expert-data-parallel groups once per ep size, and keep the expert-parallel one."""
        if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
            ds_groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        if self.ep_size > 1:
            self.expert_group = ds_groups._get_expert_parallel_group(self.expert_group_name)

    @property
    def capacity_factor(self) -> Optional[float]:
        """The train factor in training mode, else the eval one (None: dropless)."""
        return self.config.train_capacity_factor if self.training else self.config.eval_capacity_factor

    def forward(self, x: Tensor, modality: Tensor) -> tuple[Tensor, LayerRouting]:
        """x [B, N, d], modality [B, N] (the model's modality id per token, −1 padding) → y [B, N, d], routing.

        A dropped or padding token gets exactly zero here and keeps its residual stream.
        """
        batch, tokens, width = x.shape
        ops = limoe_kernels.get_ops(resolve_backend(self.config.backend, x.device))
        grouping = Grouping.for_batch(batch, self.config.group_size)
        modality = grouping.group(modality, PADDING).reshape(-1)  # [G·S]
        groups = grouping.num_groups
        size = modality.shape[0] // groups
        dtype = _compute_dtype(x)
        flat = grouping.group(x, 0.0).reshape(groups * size, width).to(dtype)  # [G·S, d]
        experts = [parameter.to(dtype) for parameter in self.expert_parameters()]
        capacity = expert_capacity(size, self.num_experts, self.capacity_factor)
        noise = None
        if self.training and self.config.router_noise:  # N(0, (1/E)²), V-MoE's noisy top-k
            noise = torch.empty(flat.shape[0], self.num_experts, device=x.device).normal_(0.0, 1.0 / self.num_experts)
        with torch.autocast(x.device.type, enabled=False):  # the ops take their dtypes as given
            if self.expert_group is None:
                layer = ops.moe_layer(flat, self.router_weight, noise, modality, *experts, size, self.num_modalities,
                                      1.0 / self.num_experts, capacity, self.config.batch_priority)
            else:
                layer = self._expert_parallel(ops, flat, noise, modality, experts, size, capacity)
        return grouping.ungroup(layer.y.view(groups, size, width), tokens), self._routing_record(layer, grouping, tokens, capacity)

    def _expert_parallel(self, ops, flat: Tensor, noise: Optional[Tensor], modality: Tensor, experts: list[Tensor],
                         size: int, capacity: int) -> MoeLayerOutput:
        """The layer composed of its ops around the exchange: route and assign slots here, send each
        expert's kept rows (at the start of its G·C-row slab) to its rank, run the local experts
        over the rows every rank sent, send the results back and combine them with the gates."""
        groups, width = flat.shape[0] // size, flat.shape[1]
        router = ops.top1_router(flat, self.router_weight, noise, modality, size, self.num_modalities,
                                 1.0 / self.num_experts)
        plan = ops.assign_slots(router.expert.view(groups, size), router.gate.view(groups, size),
                                modality.view(groups, size), self.num_experts, capacity, self.config.batch_priority,
                                self.num_modalities)
        slab = groups * capacity
        expert = router.expert.clamp(min=0)  # [G·S]
        within_expert = plan.row_of_token - plan.segment_start[expert]  # place among the expert's kept rows
        slab_row = torch.where(plan.slot.view(-1) >= 0, expert * slab + within_expert, -1)  # [G·S]
        buffer = ops.dispatch(flat, slab_row, self.num_experts * slab).view(self.num_experts, slab, width)
        local = experts_all_to_all(buffer, self.expert_group)  # [E_local, ep·G·C, d]
        counts = experts_all_to_all_counts(plan.segment_count[: self.num_experts], self.expert_group)  # [E_local, ep]
        local = ops.expert_ffn(local, counts, *experts)
        out = experts_all_to_all_back(local, self.expert_group)  # [E, G·C, d]
        y = ops.combine(out.view(self.num_experts * slab, width), slab_row, router.gate)  # [G·S, d]
        return MoeLayerOutput(y, router, plan.slot, plan.kept)

    @staticmethod
    def _routing_record(layer: MoeLayerOutput, grouping: Grouping, tokens: int, capacity: int) -> LayerRouting:
        """Auxiliary-loss inputs and statistics for this call, all from the ops' outputs."""
        router, groups = layer.router, grouping.num_groups
        return LayerRouting(
            importance=router.importance,
            load=router.load,
            z=router.z,
            token_entropy=router.token_entropy,
            marginal_entropy=router.marginal_entropy,
            present=router.present,
            routed=router.routed,
            kept=layer.kept,
            prob_sum=router.prob_sum,
            entropy_sum=router.entropy_sum,
            expert=grouping.ungroup(router.expert.view(groups, -1), tokens),
            kept_mask=grouping.ungroup(layer.slot >= 0, tokens),
            capacity=capacity,
            num_groups=groups,
        )

