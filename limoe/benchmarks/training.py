"""End-to-end training throughput on one GPU: LIMoE, its dense twin and open_clip's CLIP.

    python -m limoe.benchmarks.training                         # limoe-b32, limoe-b16, their dense twins, ViT-B-32, ViT-B-16
    python -m limoe.benchmarks.training --compile               # every model also under torch.compile
    python -m limoe.benchmarks.training --models limoe-b16 ViT-B-16 --compile ViT-B-16
    python -m limoe.benchmarks.training --through-trainer       # LIMoE rows also through the real training loop
    python -m limoe.benchmarks.training --compile --through-trainer   # … and through it with train.compile too
    python -m limoe.benchmarks.training --cpu [--through-trainer]   # tiny fp32 smoke run on CPU; numbers mean nothing

A model-only step is one optimizer update with the batch already on the device: the forward
under bf16 autocast (fp32 weights), the loss (LIMoE: contrastive + auxiliary routing losses,
through `ContrastiveObjective`; open_clip: its `ClipLoss`), backward and AdamW. Every model gets
the same batch of random images and full-length random captions. `--compile` wraps the loss
function (forward + loss) in `torch.compile`; backward and optimizer stay eager.

A trainer step (`--through-trainer`) is one iteration of the `limoe train` loop: the next batch
from `limoe.data.pipeline.train_loader` over temporary webdataset shards of random JPEGs at the model's
image size (uint8, copied to the GPU ahead of its step by `DeviceBatches`), `limoe.training.step.train_step`
on the engine from `limoe.training.trainer.build_engine` (DeepSpeed, global gradient clipping, AdamW,
schedule) and the `TrainingReporter`'s per-step bookkeeping. Checkpoints are not in it. With
`--compile` for that model, a second trainer row runs with `train.compile: true` (the tower under
Inductor inside the engine). The recipe's micro-batching and activation checkpointing are turned
off, so every row does the same model work. Its ratio to the model-only eager row of the same
model is the cost of the real loop: data, DeepSpeed, clipping.

Timing: after `--warmup` steps, `--steps` steps run back to back with a CUDA event recorded
between consecutive steps and no synchronisation until after the last one, so the GPU queue is
never drained by the benchmark itself (a step that syncs on its own pays for it). Reported: the
median step time; pairs/s = batch × steps / total time of the timed steps (so loader stalls
count); the peak of `torch.cuda.max_memory_allocated` over the timed steps; model FLOPs per pair
(`training_flops_per_pair`) and MFU = FLOPs per pair × pairs/s / `--peak-tflops`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import open_clip
import torch
import webdataset as wds
from open_clip.loss import ClipLoss
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from torch import Tensor, nn

from limoe.config import CONFIG_DIR, Config, ModelConfig, load_config
from limoe.data.pipeline import train_loader
from limoe.model.tower import build_model
from limoe.training.device_batches import DeviceBatches
from limoe.training.objectives import ContrastiveObjective
from limoe.training.progress import TrainingReporter
from limoe.training.session import start_session
from limoe.training.step import StepOutcome, train_step
from limoe.training.trainer import build_engine, optimizer_groups

H100_SXM_BF16_TFLOPS = 989.0  # dense (no 2:4 sparsity) bf16 peak; H200 has the same, H100 PCIe 756

# ---------------------------------------------------------------------------------------------
# Model FLOPs, from the config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """One modality's sequence through a transformer tower: what its matmul FLOPs depend on."""

    tokens: int  # N, the sequence length attention runs over
    width: int  # d
    depth: int
    mlp_dim: int  # h, of the dense MLP or of one expert
    embed: int  # FLOPs of the input embedding (the patch projection; a token lookup is free)
    head: int  # FLOPs of pooling and the projection into the joint space
    moe_layers: int = 0  # blocks with a router
    experts: int = 0  # E


def stream_forward_flops(stream: Stream) -> int:
    """Forward matmul FLOPs (2 per multiply-add) of one sequence.

    Per token and block: qkv 6d² + attention scores and weighted values 4Nd + output 2d² +
    MLP 4dh (top-1: one expert's MLP), plus the router 2dE in a MoE block.
    """
    d, n = stream.width, stream.tokens
    block = 6 * d * d + 4 * n * d + 2 * d * d + 4 * d * stream.mlp_dim
    router = 2 * d * stream.experts
    return n * (stream.depth * block + stream.moe_layers * router) + stream.embed + stream.head


def training_flops_per_pair(streams: list[Stream]) -> int:
    """Model FLOPs of one training step per image-text pair: 3 × forward (backward = 2 × forward).

    Counted: every matmul of the image and text streams (`stream_forward_flops`), the patch
    projection (2·3p²·d per patch) and the heads (MAP pooling, see `pool_flops`; projection
    2dD). Left out: norms, softmax, GELU, additions, the loss's B×B logits (4·B·D per pair,
    under 0.1 % at B = 256) and the optimizer. Text padding counts (dense layers compute it);
    a MoE layer counts one expert per token, not its capacity slots: these are model FLOPs,
    not the FLOPs the hardware runs.
    """
    return 3 * sum(stream_forward_flops(s) for s in streams)


def pool_flops(kind: str, tokens: int, width: int, mlp_dim: int) -> int:
    """MAP: probe query 2d² + keys and values 4d²N + one query's attention 4Nd + output 2d² +
    MLP 4dh. cls, eos and mean pooling do no matmul."""
    d = width
    if kind != "map":
        return 0
    return 2 * d * d + 4 * d * d * tokens + 4 * tokens * d + 2 * d * d + 4 * d * mlp_dim


def limoe_streams(config: ModelConfig) -> list[Stream]:
    """The image stream (patches, + a class token with cls pooling) and the text stream."""
    d, h, p = config.width, config.mlp_dim, config.patch_size
    project = 2 * d * config.embed_dim
    moe = dict(moe_layers=len(config.moe_layers), experts=config.moe.num_experts)
    image_tokens = config.num_patches + (config.image_pool == "cls")
    image = Stream(image_tokens, d, config.depth, h, embed=config.num_patches * 2 * 3 * p * p * d,
                   head=pool_flops(config.image_pool, image_tokens, d, h) + project, **moe)
    text = Stream(config.context_length, d, config.depth, h, embed=0,
                  head=pool_flops(config.text_pool, config.context_length, d, h) + project, **moe)
    return [image, text]


def open_clip_streams(model_config: dict) -> list[Stream]:
    """open_clip's two towers: a ViT with a class token and a causal text transformer (counted
    as full attention, which is what its masked attention computes)."""
    vision, text = CLIPVisionCfg(**model_config["vision_cfg"]), CLIPTextCfg(**model_config["text_cfg"])
    if vision.attentional_pool or vision.timm_model_name or text.hf_model_name:
        raise ValueError("FLOPs are counted for open_clip's plain ViT and text transformer towers only")
    patches = (vision.image_size // vision.patch_size) ** 2

    def tower(cfg, tokens: int, embed: int) -> Stream:
        projection = 2 * cfg.width * model_config["embed_dim"]
        return Stream(tokens, cfg.width, cfg.layers, int(cfg.width * cfg.mlp_ratio), embed, projection)

    return [tower(vision, patches + 1, patches * 2 * 3 * vision.patch_size**2 * vision.width),
            tower(text, text.context_length, 0)]


# ---------------------------------------------------------------------------------------------
# The models under test
# ---------------------------------------------------------------------------------------------

DENSE_SUFFIX = "-dense"
TINY_OPEN_CLIP = "open_clip-tiny"
# limoe-tiny's sizes as open_clip's two towers, for the CPU smoke run.
TINY_OPEN_CLIP_CONFIG = dict(
    embed_dim=128,
    vision_cfg=dict(image_size=64, patch_size=8, width=128, layers=4, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=128, heads=4, layers=4),
)
PARTNERS = {"limoe-b32": "ViT-B-32", "limoe-b16": "ViT-B-16", "limoe-tiny": TINY_OPEN_CLIP}
GPU_MODELS = ["limoe-b32", "limoe-b32-dense", "limoe-b16", "limoe-b16-dense", "ViT-B-32", "ViT-B-16"]
CPU_MODELS = ["limoe-tiny", "limoe-tiny-dense", TINY_OPEN_CLIP]


@dataclass(frozen=True)
class Spec:
    """A row's model: a LIMoE config (optionally its dense twin) or an open_clip architecture."""

    label: str
    kind: str  # "limoe" or "open_clip"
    name: str  # configs/models name, or open_clip model name
    dense: bool = False

    @property
    def partner(self) -> Optional[str]:
        """The open_clip model this LIMoE model is compared with."""
        return PARTNERS.get(self.name) if self.kind == "limoe" else None


def limoe_model_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))


def resolve_spec(label: str) -> Spec:
    """`limoe-b16`, `limoe-b16-dense`, an open_clip model name, or `open_clip-tiny`."""
    base = label.removesuffix(DENSE_SUFFIX)
    if base in limoe_model_names():
        return Spec(label, "limoe", base, dense=base != label)
    if label == TINY_OPEN_CLIP or label in open_clip.list_models():
        return Spec(label, "open_clip", label)
    raise ValueError(
        f"unknown model {label!r}: use a LIMoE config ({', '.join(limoe_model_names())}), optionally with "
        f"'{DENSE_SUFFIX}', an open_clip model name (e.g. ViT-B-16) or {TINY_OPEN_CLIP}"
    )


def train_config(spec: Spec, batch: int, device: torch.device, overrides: list[str] = ()) -> Config:
    """The model's training config (configs/train/<name>.yaml, else the demo config), on one process."""
    has_recipe = (CONFIG_DIR / "train" / f"{spec.name}.yaml").exists()
    return load_config(spec.name if has_recipe else None, [
        f"model={{base: {spec.name}, dense: {str(spec.dense).lower()}}}",
        f"train.batch_size={batch}", f"train.device={device.type}", "distributed.expert_parallel_size=1",
        "train.micro_batch_size=null", "train.activation_checkpointing=none", *overrides,
    ])


def open_clip_config(spec: Spec) -> tuple[str, dict]:
    """(registered architecture, create_model overrides) of an open_clip row."""
    return ("ViT-B-32", TINY_OPEN_CLIP_CONFIG) if spec.name == TINY_OPEN_CLIP else (spec.name, {})


@dataclass
class ModelOnlyWorkload:
    """What a model-only step needs: the loss of a batch, the trained module and a fixed batch."""

    loss: Callable[[Tensor, Tensor], Tensor]
    module: nn.Module
    batch: tuple[Tensor, Tensor]  # images [B, 3, S, S], tokens [B, L]
    flops_per_pair: int


def random_batch(batch: int, image_size: int, context_length: int, vocab_size: int, device) -> tuple[Tensor, Tensor]:
    """Random images and captions without padding (every text position is a real token)."""
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    tokens = torch.randint(1, vocab_size, (batch, context_length), device=device)
    return images, tokens


def limoe_workload(spec: Spec, batch: int, device: torch.device) -> ModelOnlyWorkload:
    config = train_config(spec, batch, device)
    torch.manual_seed(config.train.seed)
    module = ContrastiveObjective(build_model(config), config).to(device)
    model = config.model
    return ModelOnlyWorkload(lambda images, tokens: module(images, tokens)[0], module,
                             random_batch(batch, model.image_size, model.context_length, model.vocab_size, device),
                             training_flops_per_pair(limoe_streams(model)))


def open_clip_workload(spec: Spec, batch: int, device: torch.device) -> ModelOnlyWorkload:
    name, overrides = open_clip_config(spec)
    model = open_clip.create_model(name, pretrained=None, output_dict=True, **overrides).to(device)
    clip_loss = ClipLoss()

    def loss(images: Tensor, tokens: Tensor) -> Tensor:
        output = model(images, tokens)
        return clip_loss(output["image_features"], output["text_features"], output["logit_scale"])

    model_config = {**open_clip.get_model_config(name), **overrides}
    vision, text = model_config["vision_cfg"], model_config["text_cfg"]
    images, tokens = random_batch(batch, vision["image_size"], text["context_length"], text["vocab_size"], device)
    return ModelOnlyWorkload(loss, model, (images, tokens), training_flops_per_pair(open_clip_streams(model_config)))


def model_step(workload: ModelOnlyWorkload, device: torch.device, compile_loss: bool) -> Callable[[], None]:
    """One AdamW update on the fixed batch; bf16 autocast on a GPU, fp32 on CPU (as `limoe train`)."""
    loss_fn = torch.compile(workload.loss) if compile_loss else workload.loss
    optimizer = torch.optim.AdamW(optimizer_groups(workload.module, 1e-4), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(*workload.batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------------------
# Through the trainer: shards, loader, DeepSpeed engine
# ---------------------------------------------------------------------------------------------

WORDS = ("a", "photo", "of", "the", "red", "blue", "small", "large", "dog", "cat", "car", "tree", "on", "in",
         "street", "field", "with", "two", "old", "bright")


def random_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random colour field: JPEG sizes and decode times nearer a photo's than noise's."""
    cells = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    cells.resize((size, size), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_random_shards(folder: Path, image_size: int, shards: int, per_shard: int, seed: int = 0) -> Path:
    """`folder/00000.tar`, …: `per_shard` samples each of a random JPEG and a short random caption."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as writer:
        for index in range(shards * per_shard):
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 13))))
            writer.write({"__key__": f"{index:08d}", "jpg": random_jpeg(rng, image_size), "txt": caption})
    return folder


@dataclass
class TrainerRun:
    """The real loop's pieces for one model; `close` stops the data workers and the reporter."""

    step: Callable[[], None]
    flops_per_pair: int
    close: Callable[[], None]


def trainer_run(spec: Spec, batch: int, device: torch.device, shards: Path, workers: int, workdir: Path,
                compile_tower: bool = False) -> TrainerRun:
    """build_engine + train_loader + train_step + TrainingReporter.step, as `limoe train` runs them."""
    config = train_config(spec, batch, device, [f"data.train={shards}", f"data.workers={workers}",
                                                f"train.compile={str(compile_tower).lower()}"])
    session = start_session(config)
    engine = build_engine(config, session)
    data = config.data
    loader = train_loader(
        data.train, batch, config.model.image_size, config.model.context_length, data.workers, data.shuffle_buffer,
        data.resampled, seed=config.train.seed, max_bad_fraction=data.max_bad_fraction,
        pin_memory=device.type == "cuda",
    )
    workdir.mkdir(parents=True, exist_ok=True)
    reporter = TrainingReporter(config, workdir, session.rank, 0)
    batches, steps = iter(DeviceBatches(loader, device)), itertools.count(1)

    def step() -> None:
        images, tokens = next(batches)
        terms, routing, stepped = train_step(engine, images, tokens, config)
        outcome = StepOutcome(terms, stepped, images.shape[0], [(None, routing)])
        reporter.step(next(steps), outcome, engine.get_lr()[0], loader.bad_samples)

    def close() -> None:
        nonlocal batches
        batches = None  # the iterator owns the worker processes
        reporter.close()

    return TrainerRun(step, training_flops_per_pair(limoe_streams(config.model)), close)


def shards_for(workdir: Path, image_size: int, batch: int, workers: int) -> Path:
    """Random shards at the model's image size, written once per size: two per data worker,
    half a batch each (the loader resamples shards, so they need not hold every step's pairs)."""
    folder = workdir / f"shards-{image_size}px"
    if not folder.exists():
        write_random_shards(folder, image_size, shards=2 * max(workers, 1), per_shard=max(batch // 2, 8))
    return folder


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _mark(device: torch.device):
    """A point in the device's queue: a recorded CUDA event, or the host clock on CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _ms_between(start, end) -> float:
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else (end - start) * 1e3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    step_ms: list[float]  # one per timed step
    peak_bytes: Optional[int]  # max_memory_allocated over the timed steps (None on CPU)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> Timing:
    """Warm up, then time `steps` back-to-back steps with a mark between each; the only
    synchronisations are before the first mark and after the last."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks = [_mark(device)]
    for _ in range(steps):
        step()
        marks.append(_mark(device))
    _synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Timing([_ms_between(a, b) for a, b in zip(marks, marks[1:])], peak)


# ---------------------------------------------------------------------------------------------
# Rows and the table
# ---------------------------------------------------------------------------------------------

MODES = ("eager", "compiled", "trainer", "trainer-compiled")
TRAINER_MODES = ("trainer", "trainer-compiled")
COLUMNS = ("model", "mode", "pairs/s", "step ms", "peak GiB", "GFLOP/pair", "MFU", "vs open_clip", "vs model-only")


@dataclass
class ThroughputRow:
    """One row of the table: one model's training throughput in one mode (or why it has none)."""

    label: str
    mode: str  # one of MODES
    partner: Optional[str]  # open_clip label this row is compared with
    batch: int
    timing: Optional[Timing] = None
    flops_per_pair: int = 0
    note: str = ""  # why there is no timing

    @property
    def pairs_per_s(self) -> float:
        return self.batch * len(self.timing.step_ms) / (sum(self.timing.step_ms) / 1e3)


@dataclass(frozen=True)
class Settings:
    batch: int
    warmup: int
    steps: int
    workers: Optional[int]
    device: torch.device
    workdir: Path


def _prepare(spec: Spec, mode: str, settings: Settings) -> tuple[Callable[[], None], int, Callable[[], None]]:
    """(step, model FLOPs per pair, cleanup) for one row."""
    batch, device = settings.batch, settings.device
    if mode in TRAINER_MODES:
        recipe = train_config(spec, batch, device)
        workers = recipe.data.workers if settings.workers is None else settings.workers
        shards = shards_for(settings.workdir, recipe.model.image_size, batch, workers)
        run = trainer_run(spec, batch, device, shards, workers, settings.workdir / f"run-{spec.label}-{mode}",
                          compile_tower=mode == "trainer-compiled")
        return run.step, run.flops_per_pair, run.close
    build = limoe_workload if spec.kind == "limoe" else open_clip_workload
    workload = build(spec, batch, device)
    return model_step(workload, device, compile_loss=mode == "compiled"), workload.flops_per_pair, lambda: None


def _time_row(spec: Spec, mode: str, settings: Settings) -> tuple[Timing, int]:
    """(timing, model FLOPs per pair); the model, engine and loader die when this returns."""
    step, flops_per_pair, close = _prepare(spec, mode, settings)
    try:
        return time_steps(step, settings.warmup, settings.steps, settings.device), flops_per_pair
    finally:
        close()


def measure(spec: Spec, mode: str, settings: Settings) -> ThroughputRow:
    """One row; a failure (out of memory, a model that does not build) becomes its note."""
    row = ThroughputRow(spec.label, mode, spec.partner, settings.batch)
    try:
        row.timing, row.flops_per_pair = _time_row(spec, mode, settings)
    except torch.OutOfMemoryError:
        row.note = "out of memory"
    except Exception as error:  # one failing model must not hide the others
        row.note = f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:100]}"
    finally:
        # Only now is the last model unreachable: collect its cycles (DeepSpeed's hooks) and cached
        # blocks, and drop compiled graphs so the next model compiles afresh with static shapes.
        torch._dynamo.reset()
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _best_pairs_per_s(rows: list[ThroughputRow], label: Optional[str], modes: tuple[str, ...]) -> Optional[float]:
    measured = [r.pairs_per_s for r in rows if r.label == label and r.mode in modes and r.timing]
    return max(measured, default=None)


def _ratio(value: float, reference: Optional[float]) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def format_row(row: ThroughputRow, rows: list[ThroughputRow], peak_tflops: float) -> str:
    label = f"{row.label:<18} {row.mode:<16}"
    if row.timing is None:
        return f"{label} {row.note}"
    pairs = row.pairs_per_s
    peak = "-" if row.timing.peak_bytes is None else f"{row.timing.peak_bytes / 2**30:.1f}"
    mfu = row.flops_per_pair * pairs / (peak_tflops * 1e12)
    vs_open_clip = _ratio(pairs, _best_pairs_per_s(rows, row.partner, ("eager", "compiled")))
    vs_model = _ratio(pairs, _best_pairs_per_s(rows, row.label, ("eager",))) if row.mode in TRAINER_MODES else "-"
    return (f"{label} {pairs:>9.1f} {statistics.median(row.timing.step_ms):>9.1f} {peak:>9} "
            f"{row.flops_per_pair / 1e9:>11.2f} {mfu:>7.2%} {vs_open_clip:>13} {vs_model:>14}")


def format_table(rows: list[ThroughputRow], peak_tflops: float) -> list[str]:
    widths = (18, 16, 9, 9, 9, 11, 7, 13, 14)
    header = " ".join(f"{name:<{w}}" if i < 2 else f"{name:>{w}}" for i, (name, w) in enumerate(zip(COLUMNS, widths)))
    return [header] + [format_row(row, rows, peak_tflops) for row in rows]


LEGEND = """\
pairs/s: batch x timed steps / their total time. step ms: median. peak GiB: max_memory_allocated.
GFLOP/pair: model FLOPs of a training step per pair (3 x forward matmuls, limoe.benchmarks.training.training_flops_per_pair).
MFU: GFLOP/pair x pairs/s / the peak above. vs open_clip: pairs/s / the fastest eager or compiled row of
the open_clip partner (limoe-b32: ViT-B-32, limoe-b16: ViT-B-16, dense twins too). vs model-only: a
trainer row's pairs/s / the same model's eager row: what data loading, DeepSpeed and clipping cost."""


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m limoe.benchmarks.training", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help=f"default: {' '.join(GPU_MODELS)} (with --cpu: {' '.join(CPU_MODELS)})")
    parser.add_argument("--batch", type=int, help="pairs per step (default 256; 8 with --cpu)")
    parser.add_argument("--steps", type=int, help="timed steps (default 20; 2 with --cpu)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; 1 with --cpu)")
    parser.add_argument("--compile", nargs="*", metavar="MODEL",
                        help="also time these models (all when none named) with the loss under torch.compile")
    parser.add_argument("--through-trainer", action="store_true",
                        help="also time LIMoE models through the real loop: shards, loader, DeepSpeed engine")
    parser.add_argument("--workers", type=int, help="data workers of the trainer rows (default: the train config's; 0 with --cpu)")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS,
                        help="the GPU's dense bf16 peak for MFU (default 989: H100 SXM)")
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 smoke run on CPU; the numbers mean nothing")
    args = parser.parse_args(argv)
    defaults = dict(models=CPU_MODELS, batch=8, steps=2, warmup=1, workers=0) if args.cpu else \
        dict(models=GPU_MODELS, batch=256, steps=20, warmup=5, workers=None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.specs = [resolve_spec(label) for label in args.models]
    except ValueError as error:
        parser.error(str(error))
    args.compile = set(args.models if args.compile == [] else args.compile or ())
    if args.compile - set(args.models):
        parser.error(f"--compile names models not in --models: {' '.join(sorted(args.compile - set(args.models)))}")
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be at least 1, --warmup at least 0")
    return args


def plan(args: argparse.Namespace) -> list[tuple[Spec, str]]:
    """Each model eager; compiled if asked; through the trainer if asked and it is a LIMoE model (compiled
    there too if asked)."""
    runs = []
    for spec in args.specs:
        runs.append((spec, "eager"))
        if spec.label in args.compile:
            runs.append((spec, "compiled"))
        if args.through_trainer and spec.kind == "limoe":
            runs.append((spec, "trainer"))
            if spec.label in args.compile:
                runs.append((spec, "trainer-compiled"))
    return runs


def benchmark_device(cpu: bool, needs_gpu: str) -> Optional[torch.device]:
    """The device a benchmark measures on: the GPU, or with `--cpu` the CPU on one intra-op thread
    (several on a busy small machine run many times slower than one). Without a GPU and without
    `--cpu`, prints `needs_gpu` and returns None."""
    if not cpu and not torch.cuda.is_available():
        print(needs_gpu)
        return None
    if cpu:
        torch.set_num_threads(1)
    return torch.device("cpu" if cpu else "cuda")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = benchmark_device(args.cpu, "limoe.benchmarks.training needs a CUDA GPU (bf16 timings). "
                                        "Use --cpu for a tiny smoke run of the harness.")
    if device is None:
        return 2
    # Library chatter goes to stderr, so stdout holds the table alone.
    with tempfile.TemporaryDirectory(prefix="limoe-bench-") as workdir, contextlib.redirect_stdout(sys.stderr):
        settings = Settings(args.batch, args.warmup, args.steps, args.workers, device, Path(workdir))
        rows = []
        for spec, mode in plan(args):
            print(f"measuring {spec.label} ({mode})", file=sys.stderr, flush=True)
            rows.append(measure(spec, mode, settings))
    name = "CPU smoke run, fp32 (not a performance figure)" if args.cpu else f"{torch.cuda.get_device_name()}, bf16 autocast"
    print(f"# {name}; torch {torch.__version__}; batch {args.batch}; warmup {args.warmup}, {args.steps} timed steps; "
          f"MFU against {args.peak_tflops:g} TFLOP/s")
    print("\n".join(format_table(rows, args.peak_tflops)))
    print(LEGEND)
    return 0


if __name__ == "__main__":
    sys.exit(main())
