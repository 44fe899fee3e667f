"""Checks every Triton launcher makes before it hands pointers to a kernel.

A kernel reads raw memory, so a wrong device, dtype or shape is not an error there: it is garbage
or a crash. The launchers call these first and fail with a ValueError that names the op.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def _interpreter_ready() -> bool:
    """Triton's library kernels (tl.max, tl.sum, …) were decorated for the interpreter, which
    happens only if it was on when triton was first imported."""
    return isinstance(triton.language.standard.max, InterpretedFunction)


def check_device(op: str, *tensors: Tensor) -> None:
    """All tensors on one device that Triton can run on: CUDA, or CPU under the interpreter."""
    devices = {tensor.device for tensor in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        if _interpreter_ready():
            return
        raise ValueError(
            f"{op}: triton was imported before its CPU interpreter was switched on; set TRITON_INTERPRET=1 "
            f"in the environment, or import limoe_kernels (or limoe) before torch._dynamo, torchvision or open_clip"
        )
    raise ValueError(f"{op}: Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}")


def check_float(op: str, name: str, tensor: Tensor) -> None:
    """The kernels load fp32, bf16 or fp16 and compute in fp32."""
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {tensor.dtype}")


def check_index(op: str, name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    """Index tensors (expert ids, rows) are int64 of a known shape."""
    if tensor.dtype != torch.int64:
        raise ValueError(f"{op}: {name} must be int64, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(tensor.shape)}")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for operands of `dtype`'s kernels: exact fp32 ("ieee") when the
    inputs are fp32, so fp32 runs match the reference; with bf16/fp16 inputs the main GEMMs run on
    tensor cores anyway and the small fp32 dots (router gradients) use tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"
