"""Top-1 expert-layer ops: each file holds one op's plain-PyTorch reference (and, where it pays,
its Triton kernel). This package never imports `limoe`: it is the layer's compute, not its model.

`get_ops(backend)` returns the set of ops the MoE layer calls, so a backend is one switch.
"""

from __future__ import annotations

from types import SimpleNamespace

from kernels.combine import combine_reference
from kernels.dispatch import dispatch_reference
from kernels.expert_ffn import expert_ffn_reference
from kernels.router import top1_router_reference
from kernels.slots import assign_slots_reference

REFERENCE_OPS = SimpleNamespace(
    top1_router=top1_router_reference,
    assign_slots=assign_slots_reference,
    dispatch=dispatch_reference,
    combine=combine_reference,
    expert_ffn=expert_ffn_reference,
)


def get_ops(backend: str) -> SimpleNamespace:
    """The ops for `backend` ('torch' is the reference; other backends are added beside it)."""
    if backend == "torch":
        return REFERENCE_OPS
    raise ValueError(f"unknown expert-layer backend {backend!r}")
