"""Per-GPU model state: parameters, gradients and optimizer state, by ZeRO stage and expert layout.

The parameters are counted on the `meta` device from the model one rank builds (its E / ep
experts of each MoE layer). Bytes per parameter follow what the trainer runs:
- weights and gradients are fp32 (bf16 autocast keeps fp32 weights and casts per use);
- AdamW keeps two fp32 moments;
- ZeRO 1 and 2 keep an fp32 master copy and the moments of this rank's partition only (shared
  parameters partitioned over all N ranks, experts over their expert-data-parallel group of
  N / ep ranks); ZeRO 2 also keeps only this rank's partition of the reduced gradients.
Transient buffers come from the DeepSpeed config the run would use: the all-reduce buffer DeepSpeed
flattens gradients into without ZeRO, ZeRO's reduce and all-gather buckets, and the temporaries of
torch's multi-tensor AdamW step (one fp32 value per parameter it updates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.moe.utils import is_moe_param

from limoe.config import Config
from limoe.distributed import ExpertSharding
from limoe.model.tower import build_model
from limoe.training.objectives import ContrastiveObjective

FP32 = 4
ADAM_MOMENTS = 2
ALLREDUCE_BUFFER_ELEMENTS = 500_000_000  # DeepSpeed's buffered_allreduce_fallback default bucket (no ZeRO)


@dataclass(frozen=True)
class ParameterCounts:
    shared: int  # parameters every rank holds
    local_experts: int  # this rank's experts' parameters (E / ep per MoE layer)
    all_experts: int  # every expert's parameters


def count_parameters(config: Config) -> ParameterCounts:
    """Parameters of the module one rank trains (tower, heads and loss parameters)."""
    with torch.device("meta"):
        whole = ContrastiveObjective(build_model(config), config)
        one_rank = ContrastiveObjective(build_model(config, ExpertSharding(config.distributed.expert_parallel_size, 0)),
                                      config)

    def split(module) -> tuple[int, int]:
        experts = sum(p.numel() for p in module.parameters() if is_moe_param(p))
        return sum(p.numel() for p in module.parameters()) - experts, experts

    shared, local = split(one_rank)
    return ParameterCounts(shared, local, split(whole)[1])


@dataclass(frozen=True)
class StateBytes:
    """Bytes one GPU holds for the model state, and the largest transient buffers around it."""

    parameters: int
    gradients: int
    optimizer: int
    reduction_buffers: int  # gradient all-reduce / ZeRO buckets (during and right after backward)
    optimizer_temporaries: int  # AdamW's multi-tensor step


def state_bytes(counts: ParameterCounts, gpus: int, expert_parallel: int, zero_stage: int,
                zero_bucket_elements: int) -> StateBytes:
    """The arithmetic of the module docstring, for N = gpus ranks and expert parallelism ep."""
    expert_data_parallel = gpus // expert_parallel
    held = counts.shared + counts.local_experts
    partition = counts.shared / gpus + counts.local_experts / expert_data_parallel  # this rank's ZeRO share
    parameters = FP32 * held
    if zero_stage == 0:
        gradients = FP32 * held
        optimizer = FP32 * ADAM_MOMENTS * held
        reduction = FP32 * min(max(counts.shared, counts.local_experts), ALLREDUCE_BUFFER_ELEMENTS)
        updated = held
    else:
        gradients = FP32 * (held if zero_stage == 1 else partition)
        optimizer = FP32 * (1 + ADAM_MOMENTS) * partition  # fp32 master partition + moments
        reduction = FP32 * 3 * zero_bucket_elements  # two reduce buckets (overlap_comm) and one all-gather bucket
        updated = partition
    return StateBytes(parameters, round(gradients), round(optimizer), reduction, round(FP32 * updated))
