"""Top-1 expert-layer ops: each file holds one op's plain-PyTorch reference and its Triton version.
The ops never import `limoe`: they are the layer's compute, not its model. This folder installs as
the package `limoe_kernels` (a bare `kernels` would clash with other distributions), so code
imports `limoe_kernels`, and the modules here import each other relatively.

`get_ops(backend)` returns the set of ops the MoE layer calls, so a backend is one switch:
'torch' is the reference, 'triton' the kernels (same names, same signatures, same semantics).

Triton decides at decoration time whether a kernel is compiled for the GPU or run by its CPU
interpreter (TRITON_INTERPRET=1), and decorates its own library kernels (tl.max, tl.sum, …) when
`triton` is first imported. On a machine without CUDA only the interpreter can run the kernels,
so importing this package there turns it on (unless TRITON_INTERPRET is already set). That works
when it happens before anything imports triton; `torch._dynamo` does (and so torchvision and
open_clip), which is why `limoe` imports this package first. If triton came first anyway, the
launchers refuse CPU tensors with an error that says so (`limoe_kernels._launch.check_device`).
`triton_available()` still reports only what the caller asked for, so automatic backend choice
never lands on the interpreter by accident.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

_INTERPRET_REQUESTED = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import combine, dispatch, expert_ffn, layer, router, slots  # noqa: E402  (after the switch above)

# Each op module defines `<op>_reference` (plain PyTorch) and `<op>` (Triton) with one signature.
_OP_MODULES = {"top1_router": router, "assign_slots": slots, "dispatch": dispatch, "expert_ffn": expert_ffn,
               "combine": combine, "moe_layer": layer}
REFERENCE_OPS = SimpleNamespace(**{op: getattr(module, f"{op}_reference") for op, module in _OP_MODULES.items()})
TRITON_OPS = SimpleNamespace(**{op: getattr(module, op) for op, module in _OP_MODULES.items()})


def triton_available() -> bool:
    """True if the Triton ops can run as intended: on a CUDA GPU, or in the CPU interpreter when
    TRITON_INTERPRET=1 was set by the caller (not by this package's CPU fallback)."""
    return torch.cuda.is_available() or _INTERPRET_REQUESTED


def get_ops(backend: str) -> SimpleNamespace:
    """The ops for `backend`: 'torch' (reference) or 'triton' (kernels; CUDA tensors, or CPU under
    the interpreter). Both namespaces hold moe_layer (the whole layer in one process) and the ops
    expert parallelism composes it from: top1_router, assign_slots, dispatch, expert_ffn, combine."""
    if backend == "torch":
        return REFERENCE_OPS
    if backend == "triton":
        return TRITON_OPS
    raise ValueError(f"unknown expert-layer backend {backend!r} (expected 'torch' or 'triton')")
