"""Typed, frozen configuration: what every other module reads.

YAML files under `configs/` are parsed into these dataclasses. Parsing is strict on purpose: an
unknown key or a value of the wrong type is an error naming the key's dotted path, because a typo
in a config silently falling back to a default can waste a week of GPU time.

A training config names its model by reference (`model: limoe-b16`, a file in `configs/models/`)
or as a mapping with `base:` plus the keys it changes, so architectures are written down once.
`--set a.b=v` overrides are parsed as YAML scalars and go through the same type checks.

Every key is declared with `setting(default, meaning, valid)`: what it means, and for numbers the
interval they must lie in (`"[1, inf)"`), checked on load so that a bad value is one line naming
the key before any data is read or model built. A new key is added the same way, then
`python -m limoe.config_docs` regenerates docs/CONFIG.md; the tests fail on a key without a
meaning or interval and on a stale docs/CONFIG.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from limoe.errors import LimoeError
from limoe.files import read_text_file
from limoe.modalities import MODALITIES  # noqa: F401  (re-exported: the registry's names, in id order)



def _config_dir() -> Path:
    """The shipped configs: `limoe.configs` when installed (a wheel, or an editable install, which
    maps it to the checkout's `configs/`; a regular package, so that this is a plain path), else
    the `configs/` beside this package in a checkout that is not installed."""
    try:
        return Path(str(importlib.resources.files("limoe.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()
# YAML 1.1 (PyYAML) reads `1e-3` and `1.0e30` as strings; for float keys they mean the number.
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# ---------------------------------------------------------------------------------------------
# Documented keys: every key says what it means and, if it holds numbers, which values are valid


@dataclass(frozen=True)
class Interval:
    """The valid values of a numeric key, written as in mathematics: `[1, inf)`, `(0, 1]`."""

    text: str

    def __post_init__(self):
        if _INTERVAL.fullmatch(self.text) is None:
            raise ValueError(f"cannot read the interval {self.text!r}; write it like '[1, inf)' or '(0, 1]'.")

    def __contains__(self, number: float) -> bool:
        left, low, high, right = _INTERVAL.fullmatch(self.text).groups()
        above = number >= float(low) if left == "[" else number > float(low)
        below = number <= float(high) if right == "]" else number < float(high)
        return above and below  # False for NaN; an open end at inf excludes inf

    def __str__(self) -> str:
        return self.text


_INTERVAL = re.compile(r"([\[(])(-inf|[-+\d.e]+), (inf|[-+\d.e]+)([\])])")


def setting(default: Any = dataclasses.MISSING, meaning: str = "", valid: Optional[str] = None) -> Any:
    """A config key: its default, what it means, and for a numeric key the interval every number it
    holds must lie in (checked when a config is loaded). `limoe config show` prints the meaning
    beside the key; docs/CONFIG.md lists every key and a test keeps it in step with this file."""
    return field(default=default, metadata={"meaning": meaning, "valid": Interval(valid) if valid else None})


# ---------------------------------------------------------------------------------------------
# The configuration


@dataclass(frozen=True)
class PerModality:
    """One number per modality (loss weights, entropy thresholds); the key holding it says which
    values are valid."""

    image: float
    text: float

    def __getitem__(self, modality: str) -> float:
        return getattr(self, modality)


@dataclass(frozen=True)
class MoeConfig:
    """Sparse expert layers: where they sit and how tokens are routed to them.

    `layers` is resolved to explicit block indices; YAML may write `every 2` (blocks 1, 3, 5, …)
    or `last N` (the last N of those), as V-MoE does.
    """

    num_experts: int = setting(8, "experts per MoE layer (E)", "[1, inf)")
    layers: tuple[int, ...] = setting((), "0-based blocks whose MLP is a mixture of experts; YAML may write "
                                      "'every 2' (blocks 1, 3, 5, …) or 'last N' (the last N of those)", "[0, inf)")
    top_k: int = setting(1, "experts each token is sent to (only top-1 is implemented)", "[1, inf)")
    group_size: int = setting(8, "examples per routing group; their image and text tokens compete for the same "
                                 "expert slots", "[1, inf)")
    train_capacity_factor: float = setting(1.05, "expert slots per group in training: ceil(k·S·c/E) for S tokens, "
                                                 "rounded up to a multiple of 4", "(0, inf)")
    eval_capacity_factor: Optional[float] = setting(2.0, "the same factor in evaluation; null: dropless (every token "
                                                         "gets its expert)", "(0, inf)")
    batch_priority: bool = setting(True, "Batch Priority Routing: fill expert slots by gate value, highest first "
                                         "(false: by position)")
    router_noise: bool = setting(True, "add N(0, (1/E)²) noise to the router logits in training")
    backend: Literal["auto", "torch", "triton"] = setting("auto", "expert layer implementation; auto: Triton on "
                                                                  "CUDA, the PyTorch reference elsewhere")
    expert_init: Literal["shared", "independent"] = setting(
        "shared", "shared: every expert of a layer starts from the same draw (V-MoE's split_rngs = False; router noise "
                  "and Batch Priority Routing separate them); independent: each expert draws its own weights")


@dataclass(frozen=True)
class ModelConfig:
    """A single-tower image-text transformer: ViT sizes, text, pooling and where the experts sit."""

    name: str = setting("custom", "the architecture's name, shown in reports and model cards")
    image_size: int = setting(224, "input images are image_size × image_size pixels", "[1, inf)")
    patch_size: int = setting(32, "side of the square image patches; must divide image_size", "[1, inf)")
    width: int = setting(768, "token width d of the tower", "[1, inf)")
    depth: int = setting(12, "transformer blocks", "[1, inf)")
    heads: int = setting(12, "attention heads; must divide width", "[1, inf)")
    mlp_dim: int = setting(3072, "hidden width of each MLP and each expert", "[1, inf)")
    embed_dim: int = setting(512, "width of the joint image-text embedding space", "[1, inf)")
    vocab_size: int = setting(49408, "token embedding rows (open_clip's BPE vocabulary has 49408)", "[1, inf)")
    context_length: int = setting(16, "caption tokens, start and end of text included", "[2, inf)")
    image_pool: Literal["map", "cls", "mean"] = setting("map", "image pooling: map = attention pooling with a "
                                                               "learned probe, cls token, or mean")
    text_pool: Literal["map", "cls", "mean", "eos"] = setting("map", "text pooling; eos: the end-of-text token")
    dense: bool = setting(False, "true: the MoE blocks become dense MLPs (the dense baseline)")
    modality_adapter_layers: int = setting(0, "PolyViT's L_adapt: the first N blocks are modality-specific (one "
                                              "dense copy per modality), the rest shared", "[0, inf)")
    moe: MoeConfig = field(default_factory=MoeConfig)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise LimoeError(
                f"model.image_size {self.image_size} is not a multiple of model.patch_size "
                f"{self.patch_size}; pick sizes that divide evenly."
            )
        if self.width % self.heads:
            raise LimoeError(f"model.width {self.width} is not divisible by model.heads {self.heads}.")
        for index in self.moe.layers:
            if not 0 <= index < self.depth:
                raise LimoeError(
                    f"model.moe.layers: block index {index} is beyond the model's depth "
                    f"{self.depth}; use indices 0..{self.depth - 1}."
                )
        if self.moe.top_k != 1:
            raise LimoeError("model.moe.top_k: only top-1 routing is implemented; set it to 1.")
        if self.modality_adapter_layers > self.depth:
            raise LimoeError(
                f"model.modality_adapter_layers {self.modality_adapter_layers} must be between 0 and the depth "
                f"{self.depth}."
            )
        adapters_with_experts = [i for i in self.moe_layers if i < self.modality_adapter_layers]
        if adapters_with_experts:
            raise LimoeError(
                f"model.modality_adapter_layers {self.modality_adapter_layers} makes MoE block "
                f"{adapters_with_experts[0]} modality-specific, but an adapter block may not be a MoE block; "
                f"lower modality_adapter_layers or move model.moe.layers past it."
            )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of blocks whose MLP is a mixture of experts (none for the dense twin)."""
        return () if self.dense else self.moe.layers

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LossConfig:
    """Contrastive loss and the V-MoE / LIMoE auxiliary losses (weights and thresholds)."""

    contrastive: Literal["clip", "siglip"] = setting("clip", "clip: symmetric InfoNCE over the global batch; "
                                                             "siglip: the pairwise sigmoid loss")
    logit_scale_init: float = setting(math.log(10.0), "initial log-temperature (log 10); training keeps it in "
                                                      "[0, log 100]", "[0, 4.6052]")
    logit_bias_init: float = setting(-10.0, "initial logit bias of the siglip loss (unused by clip)", "(-inf, inf)")
    importance: float = setting(0.005, "weight of V-MoE's importance loss", "[0, inf)")
    load: float = setting(0.005, "weight of V-MoE's load loss", "[0, inf)")
    local_entropy: PerModality = setting(PerModality(image=0.01, text=0.01), "weight of LIMoE's local entropy "
                                         "loss, per modality", "[0, inf)")
    global_entropy: PerModality = setting(PerModality(image=0.01, text=0.01), "weight of LIMoE's global entropy "
                                          "loss, per modality", "[0, inf)")
    global_entropy_min_experts: PerModality = setting(
        PerModality(image=8.0, text=3.0), "S_m: the global entropy loss is off once a modality's marginal routing "
        "entropy reaches log S_m", "[1, inf)")
    router_z: float = setting(0.0, "weight of ST-MoE's router z-loss (0: off)", "[0, inf)")
    local_loss: bool = setting(True, "clip: each rank computes its own pairs' rows of the logits, B_local × B_global "
                                     "instead of B_global²; the loss averaged over ranks and the gradient are the "
                                     "same (siglip always works in local blocks)")


@dataclass(frozen=True)
class ShardSource:
    """A set of webdataset shards and how often it is drawn when mixed with other sources."""

    shards: str = setting(meaning="shard spec: a folder, glob, brace pattern, list of those, pipe: command or URL")
    weight: Optional[float] = setting(None, "sampling weight relative to the other sources; null: in proportion "
                                            "to the source's size (docs/DATA.md)", "(0, inf)")
    upsampling: float = setting(1.0, "multiplies the size-proportional weight (open_clip's "
                                     "--train-data-upsampling-factors)", "(0, inf)")

    def __post_init__(self):
        if self.weight is not None and self.upsampling != 1.0:
            raise LimoeError(f"data.train source {self.shards}: give a weight or an upsampling factor, not both.")


@dataclass(frozen=True)
class DataConfig:
    """Where training and held-out pairs come from and how they are read."""

    train: tuple[ShardSource, ...] = setting(
        (ShardSource("data_shards/train"),), "training sources: one shard spec, open_clip's 'a::b' list of specs, "
        "or a list of sources with the keys below")
    heldout: str = setting("data_shards/heldout", "caption shards for the end-of-training retrieval report")
    workers: int = setting(2, "data loading processes per rank", "[0, inf)")
    shuffle_buffer: int = setting(1000, "samples in each worker's shuffle buffer (0 or 1: no shuffling)", "[0, inf)")
    resampled: bool = setting(True, "draw shards with replacement (LAION-style); false: shuffled epochs")
    max_bad_fraction: float = setting(0.01, "stop once a worker's fraction of unusable samples passes this",
                                      "[0, 1]")
    resize_on: Literal["worker", "device"] = setting(
        "worker", "where training crops are resized: in the data workers (PIL), or on the device after the copy "
        "(batched, with PIL's bicubic weights; the main process on a CPU-only run), which frees about 40% of a "
        "worker's time at 224 px")

    def __post_init__(self):
        if len({source.weight is None for source in self.train}) > 1:
            raise LimoeError("data.train: give every source a weight, or none (then sources are mixed in "
                             "proportion to their sizes).")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay, linear warmup, then cosine or linear decay."""

    lr: float = setting(1e-3, "peak learning rate, reached at the end of the warmup", "(0, inf)")
    min_lr: float = setting(1e-5, "learning rate at the last step", "[0, inf)")
    weight_decay: float = setting(1e-4, "decoupled weight decay (not on norms, biases, embeddings, the logit "
                                        "scale)", "[0, inf)")
    betas: tuple[float, ...] = setting((0.9, 0.999), "Adam's β1 and β2", "[0, 1)")
    eps: float = setting(1e-8, "Adam's ε", "(0, inf)")
    warmup_steps: int = setting(10_000, "steps of linear warmup from 0 to lr", "[0, inf)")
    schedule: Literal["cosine", "linear"] = setting("linear", "decay from lr to min_lr after the warmup")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)", "[0, inf)")

    def __post_init__(self):
        if len(self.betas) != 2:
            raise LimoeError(f"optim.betas must be two numbers [β1, β2], got {list(self.betas)}.")


@dataclass(frozen=True)
class TrainConfig:
    """How long, how big a batch, on what, and how often to log and save."""

    steps: int = setting(100_000, "optimizer steps of the whole run", "[1, inf)")
    batch_size: int = setting(16_384, "pairs per step, summed over all data-parallel ranks", "[1, 10000000]")
    seed: int = setting(0, "seeds the weights, the data order and the router noise", "[0, 4294967295]")
    log_every: int = setting(50, "steps between lines of metrics.jsonl", "[1, inf)")
    checkpoint_every: int = setting(1000, "steps between checkpoints", "[1, inf)")
    keep_checkpoints: int = setting(2, "newest checkpoints kept on disk", "[1, inf)")
    routing_stats_every: int = setting(500, "steps between per-layer routing statistics", "[1, inf)")
    skip_nonfinite_steps: bool = setting(False, "skip and count steps with a non-finite loss instead of stopping")
    precision: Literal["auto", "fp32", "bf16"] = setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto: CUDA when a GPU is visible")
    micro_batch_size: Optional[int] = setting(None, "pairs per GPU per forward, a multiple of model.moe.group_size "
                                                    "that divides the per-GPU batch; the gradient is the whole "
                                                    "batch's (feature caching); null: the whole per-GPU batch",
                                              "[1, inf)")
    activation_checkpointing: Literal["none", "moe", "all"] = setting(
        "none", "recompute blocks in backward instead of keeping their activations: none, the MoE blocks, or all")
    compile: bool = setting(False, "torch.compile the tower inside the engine (Inductor); off until measured faster "
                                   "on a GPU")
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = setting(
        ("tensorboard",), "where the scalars go besides metrics.jsonl (open_clip's --report-to): tensorboard "
                          "(workdir/tensorboard), wandb (pip install 'limoe[wandb]'; WANDB_PROJECT, WANDB_MODE); [] "
                          "for neither")
    eval_every: int = setting(0, "steps between evaluations of the live model on eval.zeroshot and eval.retrieval "
                                 "(also at the last step); 0: none", "[0, inf)")
    init_from: Optional[str] = setting(None, "weights to start a fresh run from: an exported .safetensors file or a "
                                             "workdir of the same architecture (e.g. limoe pretrain's), or of its "
                                             "dense twin (sparse upcycling); optimizer and step start fresh; ignored "
                                             "when the workdir has a checkpoint")
    image_mask_ratio: float = setting(0.0, "FLIP: share of each image's patches dropped before the tower in training "
                                           "(0: off; FLIP uses 0.5); evaluation never masks", "[0, 1)")
    unmasked_steps: int = setting(0, "FLIP: the last steps of the run see whole images (at most train.steps)",
                                  "[0, inf)")

    def __post_init__(self):
        if self.unmasked_steps > self.steps:
            raise LimoeError(f"train.unmasked_steps {self.unmasked_steps} is more than train.steps {self.steps}; "
                             f"lower it.")


@dataclass(frozen=True)
class PretrainConfig:
    """`limoe pretrain`: OmniVec2's masked stages, unimodal then bimodal (see docs/TRAINING.md).

    The run takes `unimodal_steps + bimodal_steps` steps, which must equal `train.steps`. The
    defaults are MAE's (image) and BERT's (text); OmniVec2 published no ratios.
    """

    unimodal_steps: int = setting(50_000, "steps of masked image modelling alternating with masked language "
                                          "modelling", "[0, inf)")
    bimodal_steps: int = setting(50_000, "then steps of the same two tasks, each given the other modality through "
                                         "training-only cross-attention fusion", "[0, inf)")
    image_mask_ratio: float = setting(0.75, "share of patches hidden from the encoder (MAE: 0.75)", "[0, 1)")
    text_mask_ratio: float = setting(0.15, "share of caption tokens predicted (BERT: 0.15)", "(0, 1)")
    text_replace_with_mask: float = setting(0.8, "of the predicted tokens, the share shown as the learned mask "
                                                 "embedding (BERT: 0.8)", "[0, 1]")
    text_replace_with_random: float = setting(0.1, "… the share replaced by a random token (BERT: 0.1); the rest "
                                                   "stay unchanged", "[0, 1]")
    decoder_width: int = setting(512, "width of MAE's pixel decoder (MAE ViT-L: 512)", "[1, inf)")
    decoder_depth: int = setting(8, "blocks of the pixel decoder (MAE ViT-L: 8)", "[1, inf)")
    decoder_heads: int = setting(16, "attention heads of the pixel decoder (MAE ViT-L: 16)", "[1, inf)")
    fusion_depth: int = setting(1, "cross-attention fusion blocks per direction (training only, dropped by the "
                                   "export)", "[1, inf)")
    image_loss_weight: float = setting(1.0, "weight of the masked-image loss", "[0, inf)")
    text_loss_weight: float = setting(1.0, "weight of the masked-token loss", "[0, inf)")

    def __post_init__(self):
        if self.text_replace_with_mask + self.text_replace_with_random > 1:
            raise LimoeError(
                "pretrain.text_replace_with_mask and pretrain.text_replace_with_random are shares of the masked tokens, "
                "together at most 1 (BERT: 0.8 and 0.1)."
            )
        if self.decoder_width % self.decoder_heads:
            raise LimoeError(
                f"pretrain.decoder_width {self.decoder_width} is not divisible by pretrain.decoder_heads {self.decoder_heads}."
            )


@dataclass(frozen=True)
class TaskConfig:
    """One dataset and objective of a co-training run, with PolyViT's per-task settings.

    `contrastive`: image-text pairs, the usual InfoNCE (or SigLIP) loss. `classification`: images
    with `.cls` labels, scored against their class names' prompts encoded by the same tower
    (Uni-Perceiver); `candidates` is `all` (the whole label set every step) or a number N of
    classes that always includes the batch's labels.
    """

    name: str = setting(meaning="names the task in metrics and logs (`<name>/loss`)")
    kind: Literal["contrastive", "classification"] = setting(
        meaning="contrastive: image-caption shards; classification: shards with .cls labels")
    data: str = setting(meaning="shard spec, as for data.train")
    batch_size: Optional[int] = setting(None, "images per step of this task, summed over all data-parallel ranks; "
                                              "null: train.batch_size", "[1, 10000000]")
    steps: Optional[int] = setting(None, "U_j, this task's step budget; the weighted and task_by_task schedules "
                                         "run it exactly this often", "[1, inf)")
    lr_scale: float = setting(1.0, "PolyViT's lr_coefs: multiplies the learning rate of the steps that run this "
                                   "task", "(0, inf)")
    loss_weight: float = setting(1.0, "multiplies this task's loss, its routing losses included", "[0, inf)")
    classnames: Optional[str] = setting(None, "classification: class names, one per line in label order; null: "
                                              "classnames.txt beside the shards")
    templates: str = setting("simple", "classification: prompt templates, 'simple' (7), 'openai' (80) or a file; "
                                       "every class's prompts are encoded every step")
    candidates: Union[Literal["all"], int] = setting(
        "all", "classification: score against all classes, or against N that always include the batch's labels",
        "[2, inf)")


@dataclass(frozen=True)
class ScheduleConfig:
    """Which task each optimizer step trains (PolyViT's schedules); a pure function of (seed, step).

    task_by_task: every step of one task, then the next, in a random task order; alternating:
    round robin; uniform: every task equally often; weighted: task j exactly `steps` times; all
    three shuffled once with `seed`. accumulate: one batch of every task per step, gradients summed.
    """

    kind: Literal["task_by_task", "alternating", "uniform", "weighted", "accumulate"] = setting(
        "weighted", "co-training schedule: which task each step trains (docs/TRAINING.md)")
    seed: int = setting(0, "seeds the schedule's shuffles and the candidate draws", "[0, 4294967295]")


@dataclass(frozen=True)
class DistributedConfig:
    """How the processes share the work."""

    expert_parallel_size: int = setting(1, "ranks each MoE layer's experts are sharded over; divides the number "
                                           "of processes and of experts", "[1, inf)")
    zero_stage: int = setting(0, "DeepSpeed ZeRO stage: 1 partitions the optimizer state, 2 also the gradients "
                                 "(3 is refused: DeepSpeed's MoE layers do not support it)", "[0, 3]")
    timeout_minutes: int = setting(30, "collective operations wait this long before failing", "[1, inf)")
    deepspeed_config: Union[str, dict, None] = setting(
        None, "extra DeepSpeed settings merged into the generated config: a JSON file's path or a mapping; keys "
              "limoe sets (batch sizes, precision, clipping, ZeRO stage, optimizer) may only repeat its values")


@dataclass(frozen=True)
class ZeroshotEvalConfig:
    """Zero-shot classification during training, as `limoe eval zeroshot` does it."""

    data: Optional[str] = setting(None, "labelled images: an ImageNet-style class-folder tree, a clip_benchmark "
                                        "folder or webdataset shards with .cls; null: no zero-shot evaluation")
    classnames: Optional[str] = setting(None, "class names, one per line; null: classnames.txt beside the shards, "
                                              "else ImageNet-1k's")
    templates: str = setting("openai", "prompt templates: openai (CLIP's 80), simple, or a file with one per line")


@dataclass(frozen=True)
class EvalConfig:
    """What train.eval_every evaluates: every rank reads the whole set and the ranks take turns
    encoding it (the expert all-to-all needs them all), with the same code and numbers as
    `limoe eval` on that step's checkpoint."""

    zeroshot: ZeroshotEvalConfig = field(default_factory=ZeroshotEvalConfig)
    retrieval: Optional[str] = setting(None, "caption shards for image↔text recall@1/5/10; null: none")
    batch_size: int = setting(64, "images per evaluation forward on each rank", "[1, inf)")


@dataclass(frozen=True)
class Config:
    """A training run: the model, its losses, the data, the optimizer, the run, its processes and what it
    evaluates while it trains."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tasks: tuple[TaskConfig, ...] = setting((), "co-training: the datasets and their objectives, with the keys "
                                                "below; empty: contrastive training on data.train")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        if self.train.eval_every and self.eval.zeroshot.data is None and self.eval.retrieval is None:
            raise LimoeError(f"train.eval_every is {self.train.eval_every} but there is nothing to evaluate; set "
                             f"eval.zeroshot.data or eval.retrieval, or train.eval_every=0.")
        experts, shards = self.model.moe.num_experts, self.distributed.expert_parallel_size
        if self.model.moe_layers and experts % shards:
            raise LimoeError(f"model.moe.num_experts {experts} is not divisible by distributed.expert_parallel_size "
                             f"{shards}; every rank must hold the same number of experts.")
        if self.tasks:
            self._check_tasks()

    def _check_tasks(self) -> None:
        names = [task.name for task in self.tasks]
        if len(set(names)) < len(names) or any(not name or "/" in name for name in names):
            raise LimoeError(f"tasks: task names must be unique, non-empty and free of '/', got {names}.")
        kind = self.schedule.kind
        if kind in ("weighted", "task_by_task"):
            missing = [task.name for task in self.tasks if task.steps is None]
            if missing:
                raise LimoeError(f"schedule {kind} needs every task's steps (its step budget U_j); task "
                                 f"'{missing[0]}' has none.")
            total = sum(task.steps for task in self.tasks)
            if total != self.train.steps:
                raise LimoeError(
                    f"the tasks' steps add up to {total} but train.steps is {self.train.steps}; with schedule {kind} "
                    f"each task runs exactly its steps, so make train.steps their sum."
                )
        if kind == "accumulate" and any(task.lr_scale != 1.0 for task in self.tasks):
            raise LimoeError("schedule accumulate takes one optimizer step for all tasks together, so a task's "
                             "lr_scale cannot apply; weight the tasks with loss_weight instead.")

    def task_batch_size(self, task: TaskConfig) -> int:
        """A task's global batch size (the train batch size unless the task sets its own)."""
        return task.batch_size if task.batch_size is not None else self.train.batch_size


# ---------------------------------------------------------------------------------------------
# MoE placement helpers


def every_n_layers(depth: int, n: int = 2) -> tuple[int, ...]:
    """Blocks n-1, 2n-1, … (0-based): V-MoE's "every 2" puts experts in blocks 1, 3, 5, …"""
    return tuple(range(n - 1, depth, n))


def last_n_layers(depth: int, count: int, every: int = 2) -> tuple[int, ...]:
    """The last `count` of the every-`every` positions (V-MoE's "last N")."""
    positions = every_n_layers(depth, every)
    if count > len(positions):
        raise LimoeError(
            f"model.moe.layers: 'last {count}' asks for more MoE blocks than the {len(positions)} "
            f"'every {every}' positions of a depth-{depth} model."
        )
    return positions[len(positions) - count :]


def _resolve_layer_spec(spec: Any, depth: int) -> Any:
    """Turn `every N` / `last N` into explicit indices; leave lists to the type check."""
    if not isinstance(spec, str):
        return spec
    words = spec.split()
    if len(words) == 2 and words[1].isdigit() and words[0] in ("every", "last"):
        number = int(words[1])
        if words[0] == "every" and number < 1:
            raise LimoeError(f"model.moe.layers: {spec!r} places no experts; write 'every N' with N ≥ 1.")
        return list(every_n_layers(depth, number) if words[0] == "every" else last_n_layers(depth, number))
    raise LimoeError(
        f"model.moe.layers: cannot read {spec!r}; write a list of block indices, 'every 2' or 'last 12'."
    )


# ---------------------------------------------------------------------------------------------
# Strict conversion between plain mappings and the dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, valid: Optional[Interval] = None) -> Any:
    """Check `value` against the annotation `tp` and build dataclasses; errors name `path`.

    `valid` applies to every number `value` holds (each item of a list, both of a `PerModality`).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], path, valid)
        for option in options:  # the first type that accepts the value
            try:
                return _convert(value, option, path, valid)
            except LimoeError:
                pass
        described = " or ".join(
            f"one of {list(typing.get_args(o))}" if typing.get_origin(o) is Literal else f"{_type_name(o)} in {valid}"
            for o in options
        )
        raise LimoeError(f"config key '{path}' must be {described}, got {value!r}.")
    if origin is Literal:
        if value not in args:
            raise LimoeError(f"config key '{path}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]  # a scalar is a 1-list
        if args[0] is ShardSource:  # open_clip's "a::b" lists several sources in one string
            items = [part for item in items for part in (item.split("::") if isinstance(item, str) else [item])]
        return tuple(_convert(item, args[0], f"{path}[{i}]", valid) for i, item in enumerate(items))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is ShardSource:
            value = {"shards": value}
        if not isinstance(value, dict):
            raise LimoeError(f"config key '{path}' must be a mapping, got {value!r}.")
        return from_dict(tp, value, path, valid)
    value = _scalar(value, tp, path)
    if valid is not None and value not in valid:
        kind = "an integer" if tp is int else "a number"
        raise LimoeError(f"config key '{path}' is {value!r}; it must be {kind} in {valid}.")
    return value


def _scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
        return float(value)
    if tp in (int, float, str, bool, dict) and type(value) is tp:
        return value
    raise LimoeError(
        f"config key '{path}' must be of type {_type_name(tp)}, got {value!r} ({type(value).__name__})."
    )


def _key(cls: type, name: str, value: Any, path: str, valid: Optional[Interval] = None) -> Any:
    """One key of dataclass `cls`, converted and checked against its own interval (else `valid`)."""
    declared = next(f for f in dataclasses.fields(cls) if f.name == name)
    return _convert(value, typing.get_type_hints(cls)[name], path, declared.metadata.get("valid") or valid)


def from_dict(cls: type, data: dict, path: str = "", valid: Optional[Interval] = None) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, wrong types and numbers out of range."""
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise LimoeError(f"unknown config key '{dotted}'{hint}.")
        kwargs[key] = _key(cls, key, value, dotted, valid)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise LimoeError(f"config key '{path or cls.__name__}' is missing '{missing[0]}'; it has no default.")
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """The inverse of `from_dict`: plain YAML-safe types (tuples become lists)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


# ---------------------------------------------------------------------------------------------
# Files, references and overrides


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(read_text_file(path, "config file"))
    except yaml.YAMLError as error:
        raise LimoeError(f"config file {path} is not valid YAML: {error}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LimoeError(f"config file {path} must hold a mapping of keys at the top level.")
    return data


def find_config(name_or_path: str, kind: str) -> Path:
    """A config file given by path, or by name under `configs/<kind>/` (e.g. `limoe-b16`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise LimoeError(f"config file {path} does not exist; check the path.")
        return path
    candidate = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
    raise LimoeError(f"no {kind} config named '{name_or_path}'; known: {', '.join(known)}, or give a .yaml path.")


def deep_merge(base: dict, update: dict) -> dict:
    """`base` updated by `update`, nested mappings merged key by key (neither is modified)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_base(raw: dict, kind: str, chain: tuple[Path, ...] = ()) -> dict:
    """A mapping with `base: name` is that config file's mapping updated by the other keys;
    `chain` holds the files already on the way, so a file that is its own base is an error."""
    if "base" not in raw:
        return raw
    raw = dict(raw)
    path = find_config(str(raw.pop("base")), kind)
    if path.resolve() in chain:
        names = " → ".join(str(link) for link in (*chain, path.resolve()))
        raise LimoeError(f"config files name each other as base: ({names}); one of them must not have a base: key.")
    base = _with_base(_read_yaml(path), kind, (*chain, path.resolve()))
    return deep_merge(base, raw)


def _resolve_model_mapping(raw: Any) -> dict:
    """A model given by name, or as `{base: name, ...changes}`, becomes a full mapping."""
    if isinstance(raw, str):
        raw = {"base": raw}
    if not isinstance(raw, dict):
        raise LimoeError(f"config key 'model' must be a model name or a mapping, got {raw!r}.")
    return _with_base(raw, "models")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a', 'b', 'c'], value parsed as a YAML scalar or list)."""
    if "=" not in text:
        raise LimoeError(f"--set {text!r}: write overrides as key.path=value, e.g. train.steps=100.")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _apply_override(raw: dict, keys: list[str], value: Any) -> None:
    """Set raw[k1][k2]…; a number picks an entry of a list (`tasks.1.steps=50`)."""
    node = raw
    for i, key in enumerate(keys):
        if isinstance(node, list):
            if not (key.isdigit() and int(key) < len(node)):
                raise LimoeError(f"--set {'.'.join(keys)}: '{'.'.join(keys[:i])}' is a list of {len(node)}; "
                                 f"index it with 0..{len(node) - 1}.")
            key = int(key)
        if i == len(keys) - 1:
            node[key] = value
            return
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            section = ".".join(keys[: i + 1])
            raise LimoeError(f"--set {'.'.join(keys)}: '{section}' is not a section of the config.")
        node = child


def _finish_model_mapping(raw: dict) -> dict:
    """Resolve references and `every N` / `last N` layer specs inside a model mapping."""
    model = _resolve_model_mapping(raw)
    moe = model.get("moe")
    if isinstance(moe, dict) and "layers" in moe:
        depth = _key(ModelConfig, "depth", model.get("depth", ModelConfig.depth), "model.depth")
        model["moe"] = {**moe, "layers": _resolve_layer_spec(moe["layers"], depth)}
    return model


def load_model_config(name_or_path: str, overrides: list[str] = ()) -> ModelConfig:
    """A model architecture by name (`limoe-h14`) or path, with `key=value` overrides."""
    raw = _resolve_model_mapping(_read_yaml(find_config(name_or_path, "models")))
    for keys, value in map(parse_override, overrides):
        _apply_override(raw, keys[1:] if keys[0] == "model" else keys, value)
    return from_dict(ModelConfig, _finish_model_mapping(raw), "model")


def load_config(name_or_path: Optional[str] = None, overrides: list[str] = (), kind: str = "train") -> Config:
    """A full run config (default `configs/<kind>/demo.yaml`) with `a.b=value` overrides.

    `kind` is where a name is looked up (`train` or `pretrain`); a `base:` always names a
    training recipe, so a pretraining config states only what it changes.
    """
    path = find_config(name_or_path or "demo", kind)
    raw = _with_base(_read_yaml(path), "train", (path.resolve(),))
    if "model" in raw:
        raw["model"] = _resolve_model_mapping(raw["model"])
    for keys, value in map(parse_override, overrides):
        _apply_override(raw, keys, value)
    if "model" in raw:
        raw["model"] = _finish_model_mapping(raw["model"])
    return from_dict(Config, raw)


def config_from_dict(data: dict) -> Config:
    """Rebuild a saved (already resolved) config, e.g. the one stored in a checkpoint."""
    return from_dict(Config, data)


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
