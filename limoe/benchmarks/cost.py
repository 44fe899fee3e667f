"""What one MoE block costs next to its dense twin, counted on CPU: kernel launches and activation passes.

    python -m limoe.benchmarks.cost                       # limoe-tiny, 8 experts, batch 64, Triton, bf16 autocast
    python -m limoe.benchmarks.cost --batch 16 --ops      # also the per-op counts
    python -m limoe.benchmarks.cost --backend torch       # the PyTorch reference ops

Without a GPU, time says nothing, but what a step launches and writes follows the code. One
training forward+backward of a block (image and text tokens of a batch of pairs in one residual
tensor, bf16 autocast over fp32 weights, the gradient of the output and, for the MoE block, of
its auxiliary-loss terms) runs under a `TorchDispatchMode` that counts

- launches: every aten op that is not a view or a bare allocation (`empty*`), plus every Triton
  kernel launch (in the CPU interpreter, `InterpretedFunction.run`); the ops inside a
  `limoe_kernels` custom op are counted one by one, as their launches;
- activation bytes: the bytes of every output of those ops that has at least one element per
  token and is not shaped like a weight, reported in passes, units of one bf16 [tokens, width]
  tensor. A bare allocation counts as written (a Triton kernel fills it), once: an op writing
  into it in place adds nothing more.

The dense twin is the same block with its MLP dense, so the difference is what the expert layer
adds: routing, slots, dispatch and combine, statistics and losses, and their backward.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import limoe_kernels  # noqa: F401  (first: Triton's CPU interpreter must be on before triton is imported)
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

from limoe.config import ModelConfig, load_model_config
from limoe.distributed import ExpertSharding
from limoe.modalities import PADDING
from limoe.modalities.tokens import Tokens
from limoe.model.tower import Block, TokenLayout

ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}
LOSS_TERMS = ("importance", "load", "z", "token_entropy", "marginal_entropy")


@dataclass
class Cost:
    launches: int = 0
    activation_bytes: int = 0
    ops: Counter = field(default_factory=Counter)  # launches by op name ("triton:<kernel>" for kernels)
    bytes_by_op: Counter = field(default_factory=Counter)


class _Counting(TorchDispatchMode):
    """Counts launches and activation bytes of everything dispatched while it is active."""

    def __init__(self, tokens: int, weight_shapes: set[tuple[int, ...]]):
        super().__init__()
        self.tokens = tokens
        self.weight_shapes = weight_shapes
        self.cost = Cost()
        self.in_kernel = False  # the interpreter's own tensor traffic is not the program's
        self.allocated: set[int] = set()  # storages counted when allocated: filling them is no second pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "limoe_kernels":  # run the op's body under this mode, to count what it launches
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        returns = func._schema.returns
        if self.in_kernel or (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)):
            return out  # a view (or inside a kernel)
        name = func._schema.name.split("::")[-1]
        tensors = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        storages = [t.untyped_storage().data_ptr() for t in tensors]
        if name in ALLOCATIONS:
            self.allocated.update(storages)
        else:
            self.cost.launches += 1
            self.cost.ops[name] += 1
        in_place = any(r.alias_info is not None and r.alias_info.is_write for r in returns)
        written = sum(t.numel() * t.element_size() for t, storage in zip(tensors, storages)
                      if t.numel() >= self.tokens and tuple(t.shape) not in self.weight_shapes
                      and not (in_place and storage in self.allocated))
        if not (in_place or name in ALLOCATIONS):
            self.allocated.difference_update(storages)  # fresh memory (perhaps at a freed allocation's address)
        if written:
            self.cost.activation_bytes += written
            self.cost.bytes_by_op[name] += written
        return out


def count(step: Callable[[], None], tokens: int, weight_shapes: set[tuple[int, ...]]) -> Cost:
    """Launches and activation bytes of `step` (see the module docstring)."""
    mode = _Counting(tokens, weight_shapes)
    run = InterpretedFunction.run

    def counted_run(kernel, *args, **kwargs):
        mode.cost.launches += 1
        mode.cost.ops["triton:" + kernel.fn.__name__] += 1
        mode.in_kernel = True
        try:
            return run(kernel, *args, **kwargs)
        finally:
            mode.in_kernel = False

    InterpretedFunction.run = counted_run
    try:
        with mode:
            step()
    finally:
        InterpretedFunction.run = run
    return mode.cost


def _weight_shapes(block: Block, config: ModelConfig) -> set[tuple[int, ...]]:
    """Every parameter's shape, transposed too (weight casts and weight gradients are not activations)."""
    shapes = set()
    for parameter in block.parameters():
        shapes |= {tuple(parameter.shape), tuple(parameter.shape[::-1]), tuple(parameter.shape[1:])}
    return shapes


def block_step(config: ModelConfig, sparse: bool, batch: int, seed: int = 0) -> tuple[Callable[[], None], Block, int]:
    """One training forward+backward of a block on a batch of pairs → (step, block, tokens)."""
    torch.manual_seed(seed)
    block = Block(config, sparse, ExpertSharding()).train()
    images, texts = config.num_patches, config.context_length
    real = torch.ones(batch, texts, dtype=torch.bool)
    real[:, texts * 5 // 8:] = False  # captions shorter than the context: padding is never routed
    image, text = config.modality_id("image"), config.modality_id("text")
    streams = [
        Tokens(torch.randn(batch, images, config.width), torch.full((batch, images), image), None, "image"),
        Tokens(torch.randn(batch, texts, config.width), torch.where(real, text, PADDING), real, "text"),
    ]
    layout = TokenLayout.of(streams)
    x = torch.cat([s.x for s in streams], dim=1).requires_grad_()

    def outputs() -> list[torch.Tensor]:
        with torch.autocast("cpu", torch.bfloat16):
            y, routing = block(x, layout)
        return [y] + ([] if routing is None else [getattr(routing, name) for name in LOSS_TERMS])

    upstream = [torch.randn_like(out) for out in outputs()]
    leaves = [x, *block.parameters()]

    def step() -> None:  # gradients returned, not accumulated: as in a step after zero_grad(set_to_none=True)
        torch.autograd.grad(outputs(), leaves, upstream)

    return step, block, x.shape[0] * x.shape[1]


def block_costs(config: ModelConfig, batch: int) -> tuple[Cost, Cost, int]:
    """(MoE block, dense block, bytes of one activation pass) for one training step of each."""
    costs = []
    for sparse in (True, False):
        step, block, tokens = block_step(config, sparse, batch)
        costs.append(count(step, tokens, _weight_shapes(block, config)))
    return costs[0], costs[1], tokens * config.width * torch.finfo(torch.bfloat16).bits // 8


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m limoe.benchmarks.cost", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="limoe-tiny", help="model config (default limoe-tiny)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument("--batch", type=int, default=64, help="pairs per step (default 64)")
    parser.add_argument("--backend", choices=("triton", "torch"), default="triton")
    parser.add_argument("--ops", action="store_true", help="also print the launches per op")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    config = load_model_config(args.model, [f"moe.num_experts={args.experts}", f"moe.backend={args.backend}"])
    moe, dense, unit = block_costs(config, args.batch)
    print(f"# {args.model}, {args.experts} experts, batch {args.batch}, {args.backend} ops, bf16 autocast; "
          f"training forward+backward of one block")
    print(f"{'block':<8} {'launches':>9} {'activation passes':>18}")
    for name, cost in (("moe", moe), ("dense", dense)):
        print(f"{name:<8} {cost.launches:>9} {cost.activation_bytes / unit:>18.2f}")
    print(f"{'extra':<8} {moe.launches - dense.launches:>+9} {(moe.activation_bytes - dense.activation_bytes) / unit:>+18.2f}")
    if args.ops:
        for name, cost in (("moe", moe), ("dense", dense)):
            print(f"\n{name} launches: " + ", ".join(f"{op} {n}" for op, n in cost.ops.most_common()))
            print(f"{name} passes: " + ", ".join(f"{op} {b / unit:.2f}" for op, b in cost.bytes_by_op.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
