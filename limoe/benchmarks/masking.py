"""FLIP's speed-up, measured: contrastive training steps at several patch mask ratios, side by side.

    python -m limoe.benchmarks.masking --cpu                   # limoe-tiny, batch 128 (the demo's), fp32 on CPU
    python -m limoe.benchmarks.masking                         # limoe-b16 on a GPU, batch 256, bf16 autocast
    python -m limoe.benchmarks.masking --models limoe-b32 --ratios 0 0.5 0.75 --batch 512

A row is `limoe.training.step.train_step` on an engine from `build_engine` (DeepSpeed, global
gradient clipping, AdamW, schedule) with `train.image_mask_ratio` set, on a fixed batch of random
images and full-length random captions already on the device: the step FLIP shortens. Data
loading, which masking does not shorten, is not in it. The rows are timed in interleaved rounds
(a few steps of each ratio in turn), so a machine whose load changes during the run slows every
row alike. pairs/s is over all timed steps of a row; `vs unmasked` divides it by ratio 0's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from limoe.benchmarks.training import benchmark_device, random_batch, resolve_spec, time_steps, train_config
from limoe.model.masking import kept_patch_count
from limoe.training.session import start_session
from limoe.training.step import train_step
from limoe.training.trainer import build_engine


@dataclass
class MaskRatioRow:
    """One row of the table: a model's training step times at one image mask ratio."""

    model: str
    ratio: float
    kept: int  # patches per image that enter the tower
    batch: int
    step_ms: list[float] = field(default_factory=list)

    @property
    def pairs_per_s(self) -> float:
        return self.batch * len(self.step_ms) / (sum(self.step_ms) / 1e3)


def masked_step(model: str, ratio: float, batch: int, device: torch.device) -> tuple[Callable[[], None], int]:
    """(one contrastive training step at this mask ratio, kept patches per image)."""
    config = train_config(resolve_spec(model), batch, device, [f"train.image_mask_ratio={ratio}", "train.steps=1000000"])
    engine = build_engine(config, start_session(config))
    m = config.model
    images, tokens = random_batch(batch, m.image_size, m.context_length, m.vocab_size, device)
    steps = iter(range(10**9))
    return (lambda: train_step(engine, images, tokens, config, next(steps))), kept_patch_count(m.num_patches, ratio)


def measure(model: str, ratios: list[float], batch: int, warmup: int, rounds: int, steps: int,
            device: torch.device) -> list[MaskRatioRow]:
    """Every ratio's step, built once, warmed up, then timed `steps` at a time in `rounds` rounds."""
    prepared = [masked_step(model, ratio, batch, device) for ratio in ratios]
    rows = [MaskRatioRow(model, ratio, kept, batch) for ratio, (_, kept) in zip(ratios, prepared)]
    for step, _ in prepared:
        time_steps(step, warmup, 0, device)
    for _ in range(rounds):
        for row, (step, _) in zip(rows, prepared):
            row.step_ms += time_steps(step, 0, steps, device).step_ms
    return rows


def format_table(rows: list[MaskRatioRow]) -> list[str]:
    lines = [f"{'model':<12} {'mask ratio':>10} {'patches':>8} {'pairs/s':>9} {'step ms':>9} {'vs unmasked':>12}"]
    for row in rows:
        unmasked = next((r.pairs_per_s for r in rows if r.model == row.model and r.ratio == 0), None)
        ratio = f"{row.pairs_per_s / unmasked:.2f}x" if unmasked else "-"
        median = sorted(row.step_ms)[len(row.step_ms) // 2]
        lines.append(f"{row.model:<12} {row.ratio:>10.2f} {row.kept:>8} {row.pairs_per_s:>9.1f} {median:>9.1f} {ratio:>12}")
    return lines


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m limoe.benchmarks.masking", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", help="LIMoE model configs (default limoe-b16; limoe-tiny with --cpu)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.5], help="patch mask ratios (default 0 0.5)")
    parser.add_argument("--batch", type=int, help="pairs per step (default 256; 128 with --cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, help="timed steps per ratio and round (default 4; 2 with --cpu)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per ratio first (default 2)")
    parser.add_argument("--cpu", action="store_true", help="fp32 on CPU, one intra-op thread")
    args = parser.parse_args(argv)
    defaults = dict(models=["limoe-tiny"], batch=128, steps=2) if args.cpu else dict(models=["limoe-b16"], batch=256, steps=4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if 0.0 not in args.ratios:
        args.ratios.insert(0, 0.0)  # the baseline every ratio is divided by
    if min(args.batch, args.rounds, args.steps) < 1 or args.warmup < 0 or not all(0 <= r < 1 for r in args.ratios):
        parser.error("--batch, --rounds and --steps must be at least 1, --warmup at least 0, ratios in [0, 1)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = benchmark_device(args.cpu, "limoe.benchmarks.masking needs a CUDA GPU; use --cpu to measure on the CPU.")
    if device is None:
        return 2
    with contextlib.redirect_stdout(sys.stderr):  # library chatter to stderr; stdout holds the table
        rows = [row for model in args.models
                for row in measure(model, args.ratios, args.batch, args.warmup, args.rounds, args.steps, device)]
    name = "CPU, fp32, 1 thread" if args.cpu else f"{torch.cuda.get_device_name()}, bf16 autocast"
    print(f"# {name}; torch {torch.__version__}; batch {args.batch}; {args.rounds} interleaved rounds of "
          f"{args.steps} steps per ratio after {args.warmup} warm-up steps")
    print("\n".join(format_table(rows)))
    print("pairs/s: batch x timed steps / their total time; step ms: median; vs unmasked: pairs/s / ratio 0's.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
