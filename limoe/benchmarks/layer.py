"""Benchmark one top-1 expert layer against a dense FFN of the same per-token size.

    python -m limoe.benchmarks.layer                 # the full grid and the training rows (CUDA GPU, bf16)
    python -m limoe.benchmarks.layer --quick         # T=16384, the d=768 shape, c=1.0
    python -m limoe.benchmarks.layer --impls dense triton torch --tokens 65536 --shapes large
    python -m limoe.benchmarks.layer --cpu           # tiny fp32 smoke run of the harness (times mean nothing)

Every implementation runs forward + backward (gradients to x and all parameters) on the same
tokens. Reported: median milliseconds over timed iterations (CUDA events, after warmup) for the
forward alone and for forward+backward, the ratio of the latter to the dense FFN's, and the peak
memory a step allocates beyond its inputs and parameters. The dense FFN is nn.Linear-GELU-nn.Linear
d→h→d on every token: what each token would cost if it had one expert to itself, so the ratio
prices routing, slots, gather and scatter, and whatever capacity costs.

The grid runs bf16 weights and tokens. The `layer` rows model a training step instead, each
against its own dense row measured the same way: fp32 master weights under bf16 autocast, the
token count of one MoE call of limoe-b16 at batch 256 (256 examples × (196 patches + 16 caption
tokens) = 54,272), routing groups of 8 examples, capacity factor 1.05.

Implementations:
    dense       nn.Linear-GELU-nn.Linear
    triton      get_ops('triton').moe_layer: the whole layer as one op (tokens routed in groups,
                BPR, capacity, grouped GEMMs over the kept tokens)
    torch       get_ops('torch').moe_layer, the plain-PyTorch reference (padded expert-major buffer)
    grouped_mm  sort by expert + torch._grouped_mm, dropless (no capacity, no padding)
    deepspeed   deepspeed.moe.layer.MoE, k=1, ep_size=1, capacity factor c (one routing group)
    tutel       tutel's moe_layer, top-1, batch_prioritized_routing=True (only if tutel imports)
    layer       the model's own MoE layer (limoe.model.moe.MoeMlp, Triton ops on a GPU) as training runs
                it: image and text tokens of whole examples routed together, router noise, BPR,
                capacity, stacked expert weights cast from fp32 per call, routing statistics and
                the auxiliary losses' backward included
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import limoe_kernels
from limoe.config import LossConfig, ModelConfig, MoeConfig
from limoe.training.losses import auxiliary_loss
from limoe.model.moe import MoeMlp
from limoe.model.routing import expert_capacity

SHAPES = {"base": (768, 3072, 8), "large": (1280, 5120, 32)}  # name → (d, h, E)
IMPLS = ("dense", "triton", "torch", "grouped_mm", "deepspeed", "tutel", "layer")
# One MoE call of limoe-b16 training at batch 256: image patches and caption tokens per example.
TRAINING_EXAMPLES, IMAGE_TOKENS, TEXT_TOKENS, TRAINING_GROUP = 256, 196, 16, 8
TRAINING_CAPACITY = 1.05


@dataclass(frozen=True)
class Case:
    tokens: int
    d: int
    hidden: int
    experts: int
    capacity_factor: float
    group_tokens: int
    dtype: torch.dtype  # of the weights and the tokens
    device: torch.device
    autocast: Optional[torch.dtype] = None  # compute dtype of a step under autocast (None: no autocast)

    @property
    def groups(self) -> int:
        return self.tokens // self.group_tokens

    @property
    def capacity(self) -> int:
        """Slots per expert per group, as the MoE layer computes them."""
        return expert_capacity(self.group_tokens, self.experts, self.capacity_factor)


Layer = tuple[Callable[[Tensor], Tensor], list[Tensor]]  # forward x [T, d] → y [T, d], trained tensors


def _expert_params(case: Case) -> tuple[Tensor, list[Tensor]]:
    """w_router [E, d] and (w_in [E, h, d], b_in [E, h], w_out [E, d, h], b_out [E, d]), leaves (Linear layout)."""
    e, d, h = case.experts, case.d, case.hidden
    shapes_and_scales = [((e, d), d**-0.5), ((e, h, d), d**-0.5), ((e, h), 0.0), ((e, d, h), h**-0.5), ((e, d), 0.0)]
    tensors = [
        (torch.randn(shape, device=case.device) * scale).to(case.dtype).requires_grad_()
        for shape, scale in shapes_and_scales
    ]
    return tensors[0], tensors[1:]


# ---------------------------------------------------------------------------------------------
# Implementations: each returns (forward, trained tensors)
# ---------------------------------------------------------------------------------------------


def build_dense(case: Case) -> Layer:
    ffn = nn.Sequential(nn.Linear(case.d, case.hidden), nn.GELU(), nn.Linear(case.hidden, case.d))
    ffn = ffn.to(case.device, case.dtype)
    return ffn, list(ffn.parameters())


def build_ops_layer(case: Case, backend: str) -> Layer:
    ops = limoe_kernels.get_ops(backend)
    w_router, ffn = _expert_params(case)

    modality = torch.zeros(case.tokens, dtype=torch.int64, device=case.device)

    def forward(x: Tensor) -> Tensor:
        noise = torch.randn(case.tokens, case.experts, device=case.device) / case.experts
        return ops.moe_layer(x, w_router, noise, modality, *ffn, case.group_tokens, 1, None, case.capacity, True).y

    return forward, [w_router, *ffn]


def build_layer(case: Case) -> Layer:
    """limoe.model.moe.MoeMlp on examples of image patches and caption tokens, routed in groups of
    whole examples (see `training_case`).

    The layer's output gets its auxiliary loss added (a scalar, broadcast), so the backward also
    runs through the router statistics, as a training step does.
    """
    tokens_per_example = case.group_tokens // TRAINING_GROUP
    image_tokens = tokens_per_example * IMAGE_TOKENS // (IMAGE_TOKENS + TEXT_TOKENS)
    examples = case.tokens // tokens_per_example
    config = MoeConfig(num_experts=case.experts, layers=(0,), group_size=TRAINING_GROUP,
                       train_capacity_factor=case.capacity_factor)
    _init_single_process_group(case.device)
    layer = MoeMlp(case.d, case.hidden, config).to(case.device, case.dtype).train()
    image_text = ModelConfig()  # the ids and loss weights of an image-text model
    modality = torch.full((examples, tokens_per_example), image_text.modality_id("text"), device=case.device)  # [B, N]
    modality[:, :image_tokens] = image_text.modality_id("image")
    loss_config = LossConfig().for_modalities(image_text.modalities)

    def forward(x: Tensor) -> Tensor:
        y, routing = layer(x.view(examples, tokens_per_example, case.d), modality)
        return y.view_as(x) + auxiliary_loss([routing], loss_config, case.device)[0]

    return forward, list(layer.parameters())


def build_grouped_mm(case: Case) -> Layer:
    """Dropless: sort tokens by expert, one grouped GEMM per FFN matmul over variable-size groups."""
    w_router, (w_in, b_in, w_out, b_out) = _expert_params(case)

    def forward(x: Tensor) -> Tensor:
        noise = torch.randn(case.tokens, case.experts, device=case.device) / case.experts
        gate, expert = torch.softmax((x @ w_router.t()).float() + noise, dim=-1).max(dim=-1)  # [T], [T]
        order = torch.argsort(expert)  # [T]
        offsets = torch.bincount(expert, minlength=case.experts).cumsum(0).to(torch.int32)  # [E]
        sorted_expert = expert[order]
        hidden = torch._grouped_mm(x[order], w_in.transpose(1, 2), offs=offsets) + b_in[sorted_expert]  # [T, h]
        out = torch._grouped_mm(F.gelu(hidden), w_out.transpose(1, 2), offs=offsets) + b_out[sorted_expert]  # [T, d]
        return torch.empty_like(out).index_copy(0, order, out) * gate[:, None].to(out.dtype)

    return forward, [w_router, w_in, b_in, w_out, b_out]


def build_deepspeed(case: Case) -> Layer:
    import deepspeed
    from deepspeed.moe.layer import MoE

    _init_single_process_group(case.device)
    deepspeed.init_distributed(dist_backend="nccl" if case.device.type == "cuda" else "gloo")
    expert = nn.Sequential(nn.Linear(case.d, case.hidden), nn.GELU(), nn.Linear(case.hidden, case.d))
    moe = MoE(
        case.d, expert, num_experts=case.experts, ep_size=1, k=1, capacity_factor=case.capacity_factor,
        eval_capacity_factor=case.capacity_factor, min_capacity=0, drop_tokens=True, use_rts=False,
    )
    moe.set_deepspeed_parallelism()
    moe = moe.to(case.device, case.dtype)
    return (lambda x: moe(x)[0]), list(moe.parameters())


def build_tutel(case: Case) -> Layer:
    from tutel import moe as tutel_moe

    _init_single_process_group(case.device)
    moe = tutel_moe.moe_layer(
        gate_type={"type": "top", "k": 1, "capacity_factor": case.capacity_factor, "fp32_gate": True},
        model_dim=case.d,
        experts={"type": "ffn", "count_per_node": case.experts, "hidden_size_per_expert": case.hidden,
                 "activation_fn": F.gelu},
        batch_prioritized_routing=True,
    ).to(case.device, case.dtype)
    return moe, list(moe.parameters())


def _init_single_process_group(device: torch.device) -> None:
    """A world of one, through a file store so no port is needed: DeepSpeed and Tutel ask for a group."""
    if not torch.distributed.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="kernels-bench-", delete=False).name
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


BUILDERS: dict[str, Callable[[Case], Layer]] = {
    "dense": build_dense,
    "layer": build_layer,
    "triton": lambda case: build_ops_layer(case, "triton"),
    "torch": lambda case: build_ops_layer(case, "torch"),
    "grouped_mm": build_grouped_mm,
    "deepspeed": build_deepspeed,
    "tutel": build_tutel,
}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    forward_ms: float
    step_ms: float
    peak_mib: float


def _median_ms(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Median wall time of fn: CUDA events on a GPU, perf_counter on CPU."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def measure(layer: Layer, case: Case, warmup: int, iters: int) -> Result:
    forward, params = layer
    x = torch.randn(case.tokens, case.d, device=case.device, dtype=case.dtype, requires_grad=True)
    dy = torch.randn(case.tokens, case.d, device=case.device, dtype=case.autocast or case.dtype)

    def autocast():
        return torch.autocast(case.device.type, dtype=case.autocast, enabled=case.autocast is not None)

    def step() -> None:
        with autocast():
            y = forward(x)
        torch.autograd.grad(y, [x, *params], dy.to(y.dtype))

    def forward_only() -> None:
        with torch.no_grad(), autocast():
            forward(x)

    for _ in range(warmup):
        step()
    peak_mib = _peak_mib(step, case.device)
    return Result(_median_ms(forward_only, iters, case.device), _median_ms(step, iters, case.device), peak_mib)


def _peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Memory one step allocates at its peak beyond what was allocated before it (NaN on CPU)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_one(name: str, case: Case, warmup: int, iters: int) -> Result | str:
    """Measure one implementation; a missing package, OOM or failure becomes a note in the table."""
    try:
        return measure(BUILDERS[name](case), case, warmup, iters)
    except ImportError as error:
        return f"skipped ({error.name or error} not importable)"
    except torch.OutOfMemoryError:
        return "out of memory"
    except Exception as error:  # a baseline that fails must not hide the others
        first_line = (str(error).splitlines() or [""])[0][:100]
        return f"failed: {type(error).__name__}: {first_line}"
    finally:
        if case.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m limoe.benchmarks.layer", description=__doc__.split("\n")[0])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[16384, 65536])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--capacity", nargs="+", type=float, default=[1.0, 1.25], help="capacity factors")
    parser.add_argument("--group-tokens", type=int, default=2048, help="tokens per routing group (S)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="T=16384, shape base, c=1.0, fewer iterations")
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 smoke run on CPU; times mean nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.shapes, args.capacity, args.warmup, args.iters = [16384], ["base"], [1.0], 3, 10
    if args.cpu:
        args.warmup, args.iters = 1, 2
    elif any(tokens % min(args.group_tokens, tokens) for tokens in args.tokens):
        parser.error(f"every --tokens value must be a multiple of --group-tokens ({args.group_tokens})")
    return args


def training_cases(args: argparse.Namespace) -> list[Case]:
    """The `layer` rows: one MoE call of limoe-b16 training (see the module docstring) per shape;
    on CPU a tiny one with the same structure."""
    if args.cpu:
        return [Case(4 * 20, 64, 256, 4, TRAINING_CAPACITY, TRAINING_GROUP * 20, torch.float32, torch.device("cpu"),
                     torch.bfloat16)]
    per_example = IMAGE_TOKENS + TEXT_TOKENS
    return [Case(TRAINING_EXAMPLES * per_example, *SHAPES[shape], TRAINING_CAPACITY, TRAINING_GROUP * per_example,
                 torch.float32, torch.device("cuda"), torch.bfloat16) for shape in args.shapes]


def cases(args: argparse.Namespace) -> list[Case]:
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        return [Case(256, 64, 256, 4, c, 64, dtype, device) for c in args.capacity]
    device, dtype = torch.device("cuda"), torch.bfloat16
    return [
        Case(tokens, *SHAPES[shape], c, min(args.group_tokens, tokens), dtype, device)
        for tokens in args.tokens
        for shape in args.shapes
        for c in args.capacity
    ]


def _format_row(case: Case, name: str, result: Result | str, dense: Result | str | None) -> str:
    label = f"{case.tokens:>6} {case.d:>5} {case.hidden:>5} {case.experts:>3} {case.capacity_factor:>5.2f}  {name:<11}"
    if isinstance(result, str):
        return f"{label} {result}"
    ratio = result.step_ms / dense.step_ms if isinstance(dense, Result) else float("nan")
    return f"{label} {result.forward_ms:>9.3f} {result.step_ms:>11.3f} {ratio:>8.2f} {result.peak_mib:>10.1f}"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("limoe.benchmarks.layer needs a CUDA GPU (bf16 timings). Use --cpu for a tiny smoke run of the harness.")
        return 2
    device_name = "CPU smoke run (times are not meaningful)" if args.cpu else torch.cuda.get_device_name()
    print(f"# {device_name}; torch {torch.__version__}; warmup {args.warmup}, median of {args.iters}")
    print(f"{'T':>6} {'d':>5} {'h':>5} {'E':>3} {'c':>5}  {'impl':<11} {'fwd ms':>9} {'fwd+bwd ms':>11}"
          f" {'× dense':>8} {'peak MiB':>10}")
    dense_results: dict[tuple[int, int, int], Result | str] = {}
    grid = [name for name in args.impls if name != "layer"]
    for case in cases(args) if grid else []:
        key = (case.tokens, case.d, case.hidden)
        if key not in dense_results:  # the dense FFN ignores E and c: measure once per (T, d, h)
            dense_results[key] = run_one("dense", case, args.warmup, args.iters)
        for name in grid:
            result = dense_results[key] if name == "dense" else run_one(name, case, args.warmup, args.iters)
            print(_format_row(case, name, result, dense_results[key]), flush=True)
    if "layer" in args.impls:
        print("# training: fp32 master weights under bf16 autocast, each MoE row against the dense row above it")
        for case in training_cases(args):
            dense = run_one("dense", case, args.warmup, args.iters)
            for name, result in (("dense", dense), ("layer", run_one("layer", case, args.warmup, args.iters))):
                print(_format_row(case, name, result, dense), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
