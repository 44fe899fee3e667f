"""`limoe plan`: will a training config fit in GPU memory, and with which settings?

Per GPU it adds up: the model state (`limoe.plan.state`), the activations kept for backward
(measured, `limoe.plan.activations`) for the micro-batch, the contrastive logits for the local ×
global batch, the weight copies autocast keeps, the feature cache of micro-batching, the input
images (the batch trained on and the one copied ahead: cropped, or with `data.resize_on: device`
uncropped up to the largest box a crop may ship), and the largest transient (backward's working
set, gradient reduction buffers, the optimizer step, the device resize; with `data.decode_on:
device` the full-size decodes, at most `DEVICE_DECODE_BYTES` at once), plus a fixed reserve for
the CUDA context, NCCL and allocator slack.
With audio (a task whose modalities include it, or pretraining on audio–text pairs,
`pretrain.modalities`) the step's activations are those measured for
its own modalities, its inputs are the float32 waveforms [B, T] (the batch trained on and the
one copied ahead), the log-mel spectrogram's working set is among the transients, and the report
names the tokens per clip and the host's waveform batch. It then finds, for each
activation-checkpointing mode, the largest micro-batch that fits, and recommends the setting
with the least recomputation.

A co-training config (`tasks:`) is planned step by step: each task's step is its own forward and
backward, so the run needs what its largest step needs. A contrastive task is a batch of pairs
as above (micro-batched when configured); a classification task encodes its images and, on each
GPU, a slice of every candidate class's prompts, then gathers all the prompt features — with a
large label set (`candidates: all`) the prompts, not the images, decide whether it fits.

What is estimated rather than measured: the reserve, backward's working set (the largest block's
activations once for the gradients flowing through it, twice under checkpointing, which also
recomputes it), DeepSpeed's buffers (from its bucket sizes), and a classification step's
gathered prompt features and [images × candidates] logits (counted in fp32). The comparison with
`torch.cuda.max_memory_allocated` on a GPU is in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from limoe.config import Config, LossConfig, ModelConfig
from limoe.data.crops import largest_box_side
from limoe.data.device_decode import DEVICE_DECODE_BYTES
from limoe.data.images import MAX_PIXELS
from limoe.errors import LimoeError
from limoe.prompt_templates import load_templates
from limoe.plan.activations import (
    CHECKPOINTING, PAIRS, ActivationProfile, measure_activations, measured_inputs, together, untasked_pairs,
)
from limoe.plan.launch import launch_command, nodes_for
from limoe.plan.state import FP32, ParameterCounts, StateBytes, count_parameters, state_bytes
from limoe.training.batches import check_task_batches, micro_batch_size, prompts_per_process
from limoe.training.candidates import most_candidates, task_classnames
from limoe.training.deepspeed_config import deepspeed_config

GiB = 2**30
RESERVED = 3 * GiB  # CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation [this project's default]
FEATURE_CACHE_COPIES = 4  # micro-batching keeps image and text features and their gradients for the local batch


@dataclass(frozen=True)
class Setting:
    checkpointing: str  # none, moe or all
    micro_batch: Optional[int]  # pairs per GPU per forward; None: each task's whole batch (co-training)


@dataclass(frozen=True)
class Workload:
    """What one step puts through one GPU: pairs (contrastive), or labelled images and this GPU's
    slice of their candidate classes' prompts (classification, taken whole)."""

    task: str  # the task's name; "" for a run without tasks
    kind: str  # contrastive or classification
    local: int  # pairs or images per GPU
    global_batch: int  # pairs or images summed over the GPUs
    candidates: int = 0  # classification: K, the classes one step scores (at most)
    prompts: int = 0  # classification: prompts this GPU encodes, ⌈K·T / GPUs⌉
    gathered_prompts: int = 0  # classification: K·T, the prompt features every GPU gathers
    modalities: tuple[str, ...] = PAIRS  # contrastive: the pair's two sides; classification: the input's, the prompts'

    @property
    def inputs(self) -> tuple[str, ...]:
        """The modalities whose raw batch the step copies to the GPU (prompts are made there)."""
        return self.modalities if self.kind == "contrastive" else self.modalities[:1]

    def describe(self) -> str:
        if self.kind == "contrastive":
            return f"{self.local} pairs"
        return f"{self.local} {_noun(self.modalities[0])} + {self.prompts} prompts of {self.candidates} classes"


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
    inputs: int  # uint8 images (float32 waveforms) of the batch trained on and of the one copied ahead
    # the largest of: backward's working set (+ ZeRO buckets), the reduction buffer, the step, the device resize,
    # the log-mel spectrogram
    transient: int
    reserved: int

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.weight_copies + self.activations
                + self.logits + self.feature_cache + self.inputs + self.transient + self.reserved)


@dataclass(frozen=True)
class MemoryPlan:
    config: Config
    gpus: int
    gpu_memory: int  # bytes
    counts: ParameterCounts
    state: StateBytes
    profile: ActivationProfile
    configured: Setting
    workloads: tuple[Workload, ...]  # one per task (one for a run without tasks)

    @property
    def local_batch(self) -> int:
        """The largest per-GPU batch of pairs (or images) of any step."""
        return max(workload.local for workload in self.workloads)

    @property
    def micro_batches(self) -> list[Optional[int]]:
        """The micro-batch sizes a run accepts, largest first: divisors of every contrastive step's
        per-GPU batch, in whole routing groups. None (each step's whole batch) comes first where the
        steps' batches differ; a classification step allows nothing else (it is encoded whole)."""
        group = self.config.model.moe.group_size if self.config.model.moe_layers else 1
        locals_ = {w.local for w in self.workloads if w.kind == "contrastive"}
        if not locals_ or any(w.kind == "classification" for w in self.workloads):
            return [None]
        common = math.gcd(*locals_)
        divisors = [m for m in range(common, 0, -1) if common % m == 0 and m % group == 0]
        return divisors if len(locals_) == 1 else [None, *divisors]

    def breakdown(self, setting: Setting) -> Breakdown:
        """Bytes per GPU of the step that needs the most."""
        return self.largest_step(setting)[1]

    def largest_step(self, setting: Setting) -> tuple[Workload, Breakdown]:
        steps = [(workload, self.step_breakdown(workload, setting)) for workload in self.workloads]
        return max(steps, key=lambda step: step[1].total)

    def step_breakdown(self, workload: Workload, setting: Setting) -> Breakdown:
        """Bytes per GPU while one step of `workload` runs under `setting`."""
        if workload.kind == "classification":
            return self._classification(workload, setting)
        profile, state, config = self.profile, self.state, self.config
        local = workload.local
        micro = setting.micro_batch or local
        cached = micro < local
        per_pair = profile.per_example[together(workload.modalities)]
        activations = round(per_pair[setting.checkpointing] * micro)
        global_batch = workload.global_batch
        rows = local if config.loss.local_loss and config.loss.contrastive == "clip" else global_batch
        logits = round(profile.logit_bytes * rows * global_batch + profile.gathered_feature_bytes * global_batch)
        cache = FEATURE_CACHE_COPIES * local * config.model.embed_dim * FP32 if cached else 0
        backward = self._backward(setting, micro, per_pair)
        inputs, resize = self.input_bytes(workload)
        # With micro-batching the logits live in their own step, before the micro-batches' forwards.
        transient = max(backward, logits if cached else 0, state.reduction_buffers, state.optimizer_temporaries, resize,
                        self.log_mel_bytes(workload, micro))
        return Breakdown(state.parameters, state.gradients, state.optimizer, self._weight_copies(setting), activations,
                         0 if cached else logits, cache, inputs, transient, RESERVED)

    def _classification(self, workload: Workload, setting: Setting) -> Breakdown:
        """Images and this GPU's prompts encoded whole; the gathered prompt features, the class
        embeddings and the [images × candidates] logits with their softmax, all kept for backward."""
        profile, state, checkpointing = self.profile, self.state, setting.checkpointing
        per_input, per_prompt = (profile.per_example[(name,)] for name in workload.modalities)
        activations = round(per_input[checkpointing] * workload.local + per_prompt[checkpointing] * workload.prompts)
        features = (workload.gathered_prompts + workload.candidates) * self.config.model.embed_dim * FP32
        logits = features + 2 * workload.local * workload.candidates * FP32
        # Backward runs through the image pass and the prompt pass one after the other.
        backward = max(self._backward(setting, workload.local, per_input),
                       self._backward(setting, workload.prompts, per_prompt))
        inputs, resize = self.input_bytes(workload)
        transient = max(backward, state.reduction_buffers, state.optimizer_temporaries, resize,
                        self.log_mel_bytes(workload, workload.local))
        return Breakdown(state.parameters, state.gradients, state.optimizer, self._weight_copies(setting), activations,
                         logits, 0, inputs, transient, RESERVED)

    def input_bytes(self, workload: Workload) -> tuple[int, int]:
        """(kept, transient) bytes of a step's raw inputs on the GPU: its images', its audio clips' and
        its video clips' (caption tokens are not counted), for `workload.local` examples."""
        images, clips = ("image" in workload.inputs) * workload.local, ("audio" in workload.inputs) * workload.local
        videos = ("video" in workload.inputs) * workload.local
        kept, resize = self.image_bytes(images)
        return kept + 2 * self.waveform_bytes(clips) + 2 * self.video_bytes(videos), resize

    def image_bytes(self, images: int) -> tuple[int, int]:
        """(kept, transient) bytes of a step's `images` on the GPU. Kept: the batch trained on and
        the one `DeviceBatches` copies ahead, uint8, [B, 3, S, S] when the workers crop, or with
        `data.resize_on: device` [B, H, W, 3] with H and W up to `largest_box_side`. Transient: the
        device resize in float32, the pixels [B, 3, H, W], the row pass [B, 3, S, W] and the
        weights [B, S, H] and [B, S, W] at once; with `data.decode_on: device`, the larger of that
        and the decoding: the full-size images of one decode group (at most `DEVICE_DECODE_BYTES`,
        fewer when the batch's images at the largest size the bounds allow hold less) beside the
        regions cut so far (one more uncropped batch)."""
        size = self.config.model.image_size
        if self.config.data.resize_on == "worker":
            return 2 * images * 3 * size * size, 0
        side = largest_box_side(size)
        uncropped = images * 3 * side * side
        resize = FP32 * images * (3 * side * side + 3 * size * side + 2 * size * side)
        if self.config.data.decode_on == "worker":
            return 2 * uncropped, resize
        decode = min(DEVICE_DECODE_BYTES, images * 3 * MAX_PIXELS) + uncropped
        return 2 * uncropped, max(resize, decode)

    def waveform_bytes(self, clips: int) -> int:
        """One batch of `clips` waveforms as the loader delivers them: float32 [B, T], T =
        model.audio.clip_samples (on the host, and twice on the GPU: trained on and copied ahead)."""
        return clips * self.config.model.audio.clip_samples * FP32 if clips else 0

    def video_bytes(self, clips: int) -> int:
        """One batch of `clips` video clips as the loader delivers them: uint8 [B, T, 3, S, S], T =
        model.video.frames, always cropped in the worker (twice on the GPU: trained on and copied ahead)."""
        size = self.config.model.image_size
        return clips * self.config.model.video.frames * 3 * size * size

    def log_mel_bytes(self, workload: Workload, clips: int) -> int:
        """The log-mel spectrogram's working set while `clips` of the step's audio are embedded at once."""
        return round(self.profile.log_mel_per_clip * clips) if "audio" in workload.inputs else 0

    def _weight_copies(self, setting: Setting) -> int:
        expert_share = self.counts.local_experts / max(self.counts.all_experts, 1)
        return self.profile.shared_weight_copies[setting.checkpointing] + round(
            self.profile.expert_weight_copies[setting.checkpointing] * expert_share)

    def _backward(self, setting: Setting, items: int, per_item: dict[str, float]) -> int:
        """Backward's working set for a forward of `items` pairs (or of one modality alone) with
        `per_item` activations each: one block's activation gradients; under checkpointing also its
        recomputed activations."""
        buckets = self.state.reduction_buffers if self.config.distributed.zero_stage else 0
        block = self._largest_block(per_item)
        working = (1 if setting.checkpointing == "none" else 2) * round(block * items)
        return working + buckets

    def _largest_block(self, per_item: dict[str, float]) -> float:
        """Activations per item of the largest block, from what checkpointing the MoE blocks, then the rest, saves."""
        depth, moe = self.config.model.depth, len(self.config.model.moe_layers)
        candidates = [(per_item["moe"] - per_item["all"]) / max(depth - moe, 1)]
        if moe:
            candidates.append((per_item["none"] - per_item["moe"]) / moe)
        return max(candidates)

    def fits(self, setting: Setting) -> bool:
        return self.breakdown(setting).total <= self.gpu_memory

    def largest_fitting(self, checkpointing: str) -> Optional[Setting]:
        """The setting with the largest micro-batch that fits under `checkpointing`; None if none does."""
        settings = (Setting(checkpointing, micro) for micro in self.micro_batches)
        return next((setting for setting in settings if self.fits(setting)), None)

    def recompute_cost(self, setting: Setting) -> float:
        """Estimated step compute relative to no recomputation: forward 1, backward 2, plus the
        checkpointed blocks' share of a forward, plus one forward for micro-batching's encoding pass."""
        model = self.config.model
        share = {"none": 0.0, "moe": len(model.moe_layers) / model.depth, "all": 1.0}[setting.checkpointing]
        micro_batching = setting.micro_batch is not None and setting.micro_batch < self.local_batch
        return (3 + share + micro_batching) / 3

    def without_whole_batch_micro(self, setting: Setting) -> Setting:
        """`setting` with a micro-batch that is every step's whole per-GPU batch written as None
        (no micro-batching), as the config says it."""
        if setting.micro_batch is not None and all(w.local == setting.micro_batch for w in self.workloads):
            return Setting(setting.checkpointing, None)
        return setting

    def overrides(self, setting: Setting) -> list[str]:
        """The `--set` overrides that turn the configured setting into `setting`; none when it is the
        configured one."""
        target, now = self.without_whole_batch_micro(setting), self.without_whole_batch_micro(self.configured)
        changes = []
        if target.micro_batch != now.micro_batch:
            changes.append(_micro_batch_override(target))
        if target.checkpointing != now.checkpointing:
            changes.append(_checkpointing_override(target))
        return changes

    def recommended(self) -> Optional[Setting]:
        """The fitting setting with the least recomputation; ties go to the larger micro-batch."""
        options = [s for c in CHECKPOINTING if (s := self.largest_fitting(c)) is not None]
        return min(options, key=lambda s: (self.recompute_cost(s), -(s.micro_batch or self.local_batch)), default=None)


def _bf16(config: Config) -> bool:
    return config.train.precision != "fp32"  # auto is bf16 on a GPU


@functools.lru_cache(maxsize=8)
def _profile(model: ModelConfig, loss: LossConfig, bf16: bool, inputs: tuple[tuple[str, ...], ...]) -> ActivationProfile:
    """Activations depend on the model, the losses, the precision and which modalities the steps
    encode (`measured_inputs`) only; measured once per process."""
    return measure_activations(Config(model=model, loss=loss), bf16, inputs)


def plan_memory(config: Config, gpus: int, gpu_memory: int) -> MemoryPlan:
    """The memory plan of `config` on `gpus` GPUs of `gpu_memory` bytes each; bad settings are LimoeErrors."""
    ep = config.distributed.expert_parallel_size
    if gpus < 1 or gpus % ep:
        raise LimoeError(f"distributed.expert_parallel_size {ep} does not divide the {gpus} GPUs; "
                         f"use a GPU count that is a multiple of it.")
    if config.tasks:
        check_task_batches(config, gpus)
        micro = config.train.micro_batch_size
    else:
        config.check_embedded(untasked_pairs(config), "pretrain.modalities", "pretrain.modalities")
        micro = micro_batch_size(config, gpus)
    ds_config = deepspeed_config(config, gpus, _bf16(config))
    bucket = max(ds_config["zero_optimization"].get("reduce_bucket_size", 0),
                 ds_config["zero_optimization"].get("allgather_bucket_size", 0))
    counts = count_parameters(config)
    state = state_bytes(counts, gpus, ep, config.distributed.zero_stage, int(bucket))
    profile = _profile(config.model, config.loss, _bf16(config), measured_inputs(config))
    return MemoryPlan(config, gpus, gpu_memory, counts, state, profile, Setting(config.train.activation_checkpointing, micro), workloads(config, gpus))


def workloads(config: Config, gpus: int) -> tuple[Workload, ...]:
    """Each step's shape on one GPU: the tasks' (class names and templates are read for the
    classification ones), or the one batch of pairs of a run without tasks (pretraining's
    counted as a contrastive batch of its pairs, whole inputs on both sides: its bimodal steps')."""
    if not config.tasks:
        batch = config.train.batch_size
        return (Workload("", "contrastive", batch // gpus, batch, modalities=untasked_pairs(config)),)
    steps = []
    for task in config.tasks:
        batch = config.task_batch_size(task)
        if task.kind == "contrastive":
            steps.append(Workload(task.name, "contrastive", batch // gpus, batch, modalities=task.modalities))
            continue
        classes = most_candidates(task.candidates, len(task_classnames(task)), batch)
        prompts = classes * len(load_templates(task.templates))
        steps.append(Workload(task.name, "classification", batch // gpus, batch, classes,
                              prompts_per_process(prompts, gpus), prompts, task.modalities))
    return tuple(steps)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f}"


def _micro_batch_override(setting: Setting) -> str:
    return f"train.micro_batch_size={'null' if setting.micro_batch is None else setting.micro_batch}"


def _checkpointing_override(setting: Setting) -> str:
    return f"train.activation_checkpointing={setting.checkpointing}"


def settings_line(setting: Setting) -> str:
    return f"{_micro_batch_override(setting)} {_checkpointing_override(setting)}"


def _step_name(workload: Workload) -> str:
    return f"task {workload.task}'s step" if workload.task else "this run"


def _no_fit_fix(plan: MemoryPlan) -> str:
    """What to change when no setting fits: for a classification step, its candidates come first."""
    workload, _ = plan.largest_step(Setting(CHECKPOINTING[-1], plan.micro_batches[-1]))
    if workload.kind == "classification":
        return (f"give task {workload.task} fewer candidates (candidates: N) or a smaller batch_size, or use more "
                f"GPUs")
    return "use more GPUs, more expert parallelism or ZeRO 2"


def _activations_line(plan: MemoryPlan, workload: Workload, setting: Setting) -> str:
    profile, checkpointing = plan.profile, setting.checkpointing
    if workload.kind == "classification":
        per_input, per_prompt = (profile.per_example[(name,)][checkpointing] / 2**20 for name in workload.modalities)
        return (f"{workload.local} {_noun(workload.modalities[0])} x {per_input:.2f} MiB + {workload.prompts} "
                f"prompts x {per_prompt:.2f} MiB, checkpointing {checkpointing}")
    per_pair = profile.per_example[together(workload.modalities)][checkpointing]
    return f"{setting.micro_batch or workload.local} pairs x {per_pair / 2**20:.2f} MiB, checkpointing {checkpointing}"


def _noun(name: str) -> str:
    """What the report calls a modality's examples."""
    return {"image": "images", "audio": "clips", "video": "clips"}.get(name, f"{name}s")


def _inputs_line(plan: MemoryPlan, workload: Workload) -> str:
    parts = []
    if "image" in workload.inputs:
        size = plan.config.model.image_size
        parts.append(f"2 batches uint8, {size} px crops" if plan.config.data.resize_on == "worker" else
                     f"2 batches uint8, uncropped up to {largest_box_side(size)} px a side (data.resize_on device)")
    if "audio" in workload.inputs:
        parts.append(f"2 batches of float32 waveforms [B, {plan.config.model.audio.clip_samples}]")
    if "video" in workload.inputs:
        size = plan.config.model.image_size
        parts.append(f"2 batches of uint8 clips [B, {plan.config.model.video.frames}, 3, {size}, {size}]")
    return "; ".join(parts)


def _device_input_work(config: Config) -> str:
    """The image work `data` puts among the device's transients, for the report."""
    if config.data.resize_on == "worker":
        return ""
    return ", device decode and resize" if config.data.decode_on == "device" else ", device resize"


def _audio_line(plan: MemoryPlan) -> Optional[str]:
    """Tokens per clip, the log-mel working set and the host's waveform batch, for a run that trains on audio."""
    audio_steps = [workload for workload in plan.workloads if "audio" in workload.inputs]
    if not audio_steps:
        return None
    audio = plan.config.model.audio
    host = plan.waveform_bytes(max(workload.local for workload in audio_steps))
    return (f"audio            {audio.num_patches} tokens per clip ({audio.n_mels // audio.patch_size} x "
            f"{audio.frames // audio.patch_size} patches of {audio.patch_size}, {audio.frames} frames of "
            f"{audio.clip_seconds:g} s); log-mel {plan.profile.log_mel_per_clip / 2**20:.2f} MiB per clip on the GPU; "
            f"{host / 2**20:.1f} MiB of waveforms per batch on the host")


def _logits_line(plan: MemoryPlan, workload: Workload, breakdown: Breakdown) -> str:
    if workload.kind == "classification":
        return f"{workload.gathered_prompts} gathered prompt features, {workload.local} x {workload.candidates} logits"
    local_loss = plan.config.loss.local_loss
    return (f"contrastive, {'local x global' if local_loss else 'global x global'}"
            f"{' (own step when micro-batching)' if not breakdown.logits else ''}")


def format_plan(plan: MemoryPlan, config_name: str, overrides: Sequence[str] = ()) -> str:
    """The `limoe plan` report of `config_name` with the `overrides` it was planned with, ending
    with the setting to use and the command that launches the run with it."""
    config, counts, profile = plan.config, plan.counts, plan.profile
    ep, stage = config.distributed.expert_parallel_size, config.distributed.zero_stage
    workload, configured = plan.largest_step(plan.configured)
    replicas = plan.gpus // ep
    lines = [
        f"limoe plan: {config_name} (model {config.model.name}) on {plan.gpus} GPUs of {_gib(plan.gpu_memory)} GiB",
        f"layout           expert parallelism {ep}, each expert on {replicas} GPU{'s' if replicas > 1 else ''}; ZeRO {stage}",
    ]
    if config.tasks:
        lines += [f"task {w.task:<11} {w.kind}, {w.global_batch} global, {w.describe()} per GPU" for w in plan.workloads]
    else:
        lines.append(f"batch            {config.train.batch_size} global, {plan.local_batch} per GPU")
    audio = _audio_line(plan)
    lines += [audio] if audio else []
    lines += [
        f"parameters       {counts.shared / 1e6:.1f}M shared + {counts.local_experts / 1e6:.1f}M of experts per GPU "
        f"({counts.all_experts / 1e6:.1f}M experts in all)",
        "",
        f"per GPU, GiB (at the configured setting{f'; the largest step, task {workload.task}' if workload.task else ''})",
        f"  parameters       {_gib(configured.parameters):>7}   fp32",
        f"  gradients        {_gib(configured.gradients):>7}   fp32{', partitioned' if stage == 2 else ''}",
        f"  optimizer        {_gib(configured.optimizer):>7}   AdamW moments{' + fp32 master, partitioned' if stage else ''}",
        f"  weight copies    {_gib(configured.weight_copies):>7}   kept by autocast for backward",
        f"  activations      {_gib(configured.activations):>7}   {_activations_line(plan, workload, plan.configured)}",
        f"  logits           {_gib(configured.logits):>7}   {_logits_line(plan, workload, configured)}",
        f"  feature cache    {_gib(configured.feature_cache):>7}   micro-batching",
        f"  {'input images' if 'image' in workload.inputs else 'input clips':<17}{_gib(configured.inputs):>7}   "
        f"{_inputs_line(plan, workload)}",
        f"  transient        {_gib(configured.transient):>7}   backward working set, reduction buffers, optimizer step"
        f"{_device_input_work(config)}",
        f"  reserved         {_gib(configured.reserved):>7}   CUDA context, NCCL, allocator",
        f"  total            {_gib(configured.total):>7}   {'fits' if configured.total <= plan.gpu_memory else 'DOES NOT FIT'}",
    ]
    if config.tasks:
        lines += ["", "per GPU, GiB, each task's step (at the configured setting)"]
        lines += [f"  {w.task:<16} {_gib(plan.step_breakdown(w, plan.configured).total):>7}" for w in plan.workloads]
    lines += ["", "activations per pair (MiB) and the largest micro-batch that fits, by checkpointing"]
    for checkpointing in CHECKPOINTING:
        largest = plan.largest_fitting(checkpointing)
        if largest is None:
            fit = "  none fits"
        else:
            pairs = "whole batches" if largest.micro_batch is None else f"{largest.micro_batch:>6} pairs"
            fit = f"{pairs}, {_gib(plan.breakdown(largest).total)} GiB"
        per_pair = profile.per_example[together(workload.modalities)][checkpointing]
        lines.append(f"  {checkpointing:<5} {per_pair / 2**20:>8.2f}   {fit}")
    best = plan.recommended()
    lines.append("")
    if best is None:
        lines.append(f"settings to use: none fits; {_no_fit_fix(plan)}.")
        return "\n".join(lines)
    changes = plan.overrides(best)
    cost = f"compute x{plan.recompute_cost(best):.2f} of a step without recomputation"
    if changes:
        lines.append(f"settings to use: {' '.join(changes)} ({cost})")
    else:
        lines.append(f"settings to use: no change, the configured {settings_line(plan.without_whole_batch_micro(best))} "
                     f"({cost})")
    nodes = nodes_for(plan.gpus)
    hosts = f" (on {nodes} nodes named in the DeepSpeed hostfile `hosts`)" if nodes > 1 else ""
    changed_keys = {change.split("=", 1)[0] for change in changes}
    kept = [override for override in overrides if override.split("=", 1)[0].strip() not in changed_keys]
    lines += [f"launch{hosts}:", f"  {launch_command(config_name, plan.gpus, [*kept, *changes])}"]
    return "\n".join(lines)


def refuse_if_it_cannot_fit(config: Config, gpus: int, gpu_memory: int) -> None:
    """One line with the numbers and the fix when the configured setting does not fit."""
    plan = plan_memory(config, gpus, gpu_memory)
    workload, need = plan.largest_step(plan.configured)
    if need.total <= gpu_memory:
        return
    best = plan.recommended()
    fix = f"set {settings_line(plan.without_whole_batch_micro(best))}" if best else _no_fit_fix(plan)
    items = workload.describe()
    if workload.kind == "contrastive":
        items = f"{plan.configured.micro_batch or workload.local} pairs"
    raise LimoeError(
        f"{_step_name(workload)} needs {_gib(need.total)} GiB per GPU (state "
        f"{_gib(need.parameters + need.gradients + need.optimizer)}, activations {_gib(need.activations)} for {items}, "
        f"logits {_gib(need.logits)}, other "
        f"{_gib(need.total - need.parameters - need.gradients - need.optimizer - need.activations - need.logits)}) "
        f"but the GPU has {_gib(gpu_memory)} GiB; {fix} (see `limoe plan`)."
    )
