"""`limoe plan`: will a training config fit in GPU memory, and with which settings?

Per GPU it adds up: the model state (`limoe.plan.state`), the activations kept for backward
(measured, `limoe.plan.activations`) for the micro-batch, the contrastive logits for the local ×
global batch, the weight copies autocast keeps, the feature cache of micro-batching, and the
largest transient (backward's working set, gradient reduction buffers, the optimizer step), plus
a fixed reserve for the CUDA context, NCCL and allocator slack. It then finds, for each
activation-checkpointing mode, the largest micro-batch that fits, and recommends the setting
with the least recomputation.

What is estimated rather than measured: the reserve, backward's working set (the largest block's
activations once for the gradients flowing through it, twice under checkpointing, which also
recomputes it), and DeepSpeed's buffers (from its bucket sizes). The comparison with
`torch.cuda.max_memory_allocated` on a GPU is in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from limoe.config import Config, LossConfig, ModelConfig
from limoe.errors import LimoeError
from limoe.plan.activations import CHECKPOINTING, ActivationProfile, measure_activations
from limoe.plan.state import FP32, ParameterCounts, StateBytes, count_parameters, state_bytes
from limoe.training.deepspeed_config import deepspeed_config
from limoe.training.step import micro_batch_size

GiB = 2**30
RESERVED = 3 * GiB  # CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation [this project's default]
FEATURE_CACHE_COPIES = 4  # micro-batching keeps image and text features and their gradients for the local batch


@dataclass(frozen=True)
class Setting:
    checkpointing: str  # none, moe or all
    micro_batch: int  # pairs per GPU per forward


@dataclass(frozen=True)
class Breakdown:
    """Bytes per GPU of one setting, by term."""

    parameters: int
    gradients: int
    optimizer: int
    weight_copies: int
    activations: int
    logits: int
    feature_cache: int
    transient: int  # the largest of: backward's working set (+ ZeRO buckets), the reduction buffer, the step
    reserved: int

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.weight_copies + self.activations
                + self.logits + self.feature_cache + self.transient + self.reserved)


@dataclass(frozen=True)
class MemoryPlan:
    config: Config
    gpus: int
    gpu_memory: int  # bytes
    counts: ParameterCounts
    state: StateBytes
    profile: ActivationProfile
    configured: Setting

    @property
    def local_batch(self) -> int:
        return self.config.train.batch_size // self.gpus

    @property
    def micro_batches(self) -> list[int]:
        """The micro-batch sizes a run accepts, largest first: divisors of the local batch, whole routing groups."""
        group = self.config.model.moe.group_size if self.config.model.moe_layers else 1
        local = self.local_batch
        return [m for m in range(local, 0, -1) if local % m == 0 and m % group == 0]

    def breakdown(self, setting: Setting) -> Breakdown:
        profile, state, config = self.profile, self.state, self.config
        local, micro = self.local_batch, setting.micro_batch
        cached = micro < local
        expert_share = self.counts.local_experts / max(self.counts.all_experts, 1)
        copies = profile.shared_weight_copies[setting.checkpointing] + round(
            profile.expert_weight_copies[setting.checkpointing] * expert_share)
        activations = round(profile.per_pair[setting.checkpointing] * micro)
        global_batch = config.train.batch_size
        rows = local if config.loss.local_loss and config.loss.contrastive == "clip" else global_batch
        logits = round(profile.logit_bytes * rows * global_batch + profile.gathered_feature_bytes * global_batch)
        cache = FEATURE_CACHE_COPIES * local * config.model.embed_dim * FP32 if cached else 0
        buckets = state.reduction_buffers if config.distributed.zero_stage else 0
        # Backward holds one block's activation gradients; under checkpointing also its recomputed activations.
        working = (1 if setting.checkpointing == "none" else 2) * round(self._largest_block_per_pair() * micro)
        backward = working + buckets
        # With micro-batching the logits live in their own step, before the micro-batches' forwards.
        transient = max(backward, logits if cached else 0, state.reduction_buffers, state.optimizer_temporaries)
        return Breakdown(state.parameters, state.gradients, state.optimizer, copies, activations,
                         0 if cached else logits, cache, transient, RESERVED)

    def _largest_block_per_pair(self) -> float:
        """Activations per pair of the largest block, from what checkpointing the MoE blocks, then the rest, saves."""
        per_pair, depth = self.profile.per_pair, self.config.model.depth
        moe = len(self.config.model.moe_layers)
        candidates = [(per_pair["moe"] - per_pair["all"]) / max(depth - moe, 1)]
        if moe:
            candidates.append((per_pair["none"] - per_pair["moe"]) / moe)
        return max(candidates)

    def fits(self, setting: Setting) -> bool:
        return self.breakdown(setting).total <= self.gpu_memory

    def largest_micro_batch(self, checkpointing: str) -> Optional[int]:
        return next((m for m in self.micro_batches if self.fits(Setting(checkpointing, m))), None)

    def recompute_cost(self, setting: Setting) -> float:
        """Estimated step compute relative to no recomputation: forward 1, backward 2, plus the
        checkpointed blocks' share of a forward, plus one forward for micro-batching's encoding pass."""
        model = self.config.model
        share = {"none": 0.0, "moe": len(model.moe_layers) / model.depth, "all": 1.0}[setting.checkpointing]
        return (3 + share + (setting.micro_batch < self.local_batch)) / 3

    def recommended(self) -> Optional[Setting]:
        """The fitting setting with the least recomputation; ties go to the larger micro-batch."""
        options = [Setting(c, m) for c in CHECKPOINTING if (m := self.largest_micro_batch(c)) is not None]
        return min(options, key=lambda s: (self.recompute_cost(s), -s.micro_batch), default=None)


def _bf16(config: Config) -> bool:
    return config.train.precision != "fp32"  # auto is bf16 on a GPU


@functools.lru_cache(maxsize=8)
def _profile(model: ModelConfig, loss: LossConfig, bf16: bool) -> ActivationProfile:
    """Activations depend on the model, the losses and the precision only; measured once per process."""
    return measure_activations(Config(model=model, loss=loss), bf16)


def plan_memory(config: Config, gpus: int, gpu_memory: int) -> MemoryPlan:
    """The memory plan of `config` on `gpus` GPUs of `gpu_memory` bytes each; bad settings are LimoeErrors."""
    ep = config.distributed.expert_parallel_size
    if gpus < 1 or gpus % ep:
        raise LimoeError(f"distributed.expert_parallel_size {ep} does not divide the {gpus} GPUs; "
                         f"use a GPU count that is a multiple of it.")
    micro = micro_batch_size(config, gpus)
    ds_config = deepspeed_config(config, gpus, _bf16(config))
    bucket = max(ds_config["zero_optimization"].get("reduce_bucket_size", 0),
                 ds_config["zero_optimization"].get("allgather_bucket_size", 0))
    counts = count_parameters(config)
    state = state_bytes(counts, gpus, ep, config.distributed.zero_stage, int(bucket))
    return MemoryPlan(config, gpus, gpu_memory, counts, state, _profile(config.model, config.loss, _bf16(config)),
                      Setting(config.train.activation_checkpointing, micro))


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f}"


def settings_line(setting: Setting) -> str:
    return f"train.micro_batch_size={setting.micro_batch} train.activation_checkpointing={setting.checkpointing}"


def format_plan(plan: MemoryPlan, config_name: str) -> str:
    """The `limoe plan` report."""
    config, counts, profile = plan.config, plan.counts, plan.profile
    ep, stage = config.distributed.expert_parallel_size, config.distributed.zero_stage
    configured = plan.breakdown(plan.configured)
    replicas = plan.gpus // ep
    lines = [
        f"limoe plan: {config_name} (model {config.model.name}) on {plan.gpus} GPUs of {_gib(plan.gpu_memory)} GiB",
        f"layout           expert parallelism {ep}, each expert on {replicas} GPU{'s' if replicas > 1 else ''}; ZeRO {stage}",
        f"batch            {config.train.batch_size} global, {plan.local_batch} per GPU",
        f"parameters       {counts.shared / 1e6:.1f}M shared + {counts.local_experts / 1e6:.1f}M of experts per GPU "
        f"({counts.all_experts / 1e6:.1f}M experts in all)",
        "",
        "per GPU, GiB (at the configured setting)",
        f"  parameters       {_gib(configured.parameters):>7}   fp32",
        f"  gradients        {_gib(configured.gradients):>7}   fp32{', partitioned' if stage == 2 else ''}",
        f"  optimizer        {_gib(configured.optimizer):>7}   AdamW moments{' + fp32 master, partitioned' if stage else ''}",
        f"  weight copies    {_gib(configured.weight_copies):>7}   kept by autocast for backward",
        f"  activations      {_gib(configured.activations):>7}   {plan.configured.micro_batch} pairs x "
        f"{profile.per_pair[plan.configured.checkpointing] / 2**20:.2f} MiB, checkpointing "
        f"{plan.configured.checkpointing}",
        f"  logits           {_gib(configured.logits):>7}   contrastive, "
        f"{'local x global' if config.loss.local_loss else 'global x global'}"
        f"{' (own step when micro-batching)' if not configured.logits else ''}",
        f"  feature cache    {_gib(configured.feature_cache):>7}   micro-batching",
        f"  transient        {_gib(configured.transient):>7}   backward working set, reduction buffers, optimizer step",
        f"  reserved         {_gib(configured.reserved):>7}   CUDA context, NCCL, allocator",
        f"  total            {_gib(configured.total):>7}   {'fits' if configured.total <= plan.gpu_memory else 'DOES NOT FIT'}",
        "",
        "activations per pair (MiB) and the largest micro-batch that fits, by checkpointing",
    ]
    for checkpointing in CHECKPOINTING:
        largest = plan.largest_micro_batch(checkpointing)
        fit = (f"{largest:>6} pairs, {_gib(plan.breakdown(Setting(checkpointing, largest)).total)} GiB"
               if largest else "  none fits")
        lines.append(f"  {checkpointing:<5} {profile.per_pair[checkpointing] / 2**20:>8.2f}   {fit}")
    best = plan.recommended()
    lines.append("")
    if best is None:
        lines.append("settings to use: none fits; use more GPUs, more expert parallelism or ZeRO 2.")
    else:
        lines.append(f"settings to use: {settings_line(best)} (compute x{plan.recompute_cost(best):.2f} of a step "
                     f"without recomputation)")
    return "\n".join(lines)


def refuse_if_it_cannot_fit(config: Config, gpus: int, gpu_memory: int) -> None:
    """One line with the numbers and the fix when the configured setting does not fit."""
    plan = plan_memory(config, gpus, gpu_memory)
    need = plan.breakdown(plan.configured)
    if need.total <= gpu_memory:
        return
    best = plan.recommended()
    fix = f"set {settings_line(best)}" if best else "use more GPUs, more expert parallelism or ZeRO 2"
    raise LimoeError(
        f"this run needs {_gib(need.total)} GiB per GPU (state {_gib(need.parameters + need.gradients + need.optimizer)}, "
        f"activations {_gib(need.activations)} for {plan.configured.micro_batch} pairs, logits {_gib(need.logits)}, "
        f"other {_gib(need.total - need.parameters - need.gradients - need.optimizer - need.activations - need.logits)}) "
        f"but the GPU has {_gib(gpu_memory)} GiB; {fix} (see `limoe plan`)."
    )
