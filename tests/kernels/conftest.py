"""Kernel tests run the Triton ops on CUDA when there is a GPU, else on CPU in Triton's interpreter.

Importing `kernels` turns the interpreter on where CUDA is missing, before any kernel is defined
(see kernels/__init__.py), so these tests do not depend on which test module imports it first.
On CPU they stay fp32 and small: the interpreter emulates bf16 wrongly and costs milliseconds per
tile. bf16 parity is checked on a GPU only (tests marked `gpu`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pytest
import torch
from torch import Tensor

import kernels
from kernels._launch import interpreting


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """CUDA if present, else CPU under the interpreter (skip if the interpreter was switched off)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run here")
    return torch.device("cpu")


@pytest.fixture
def ops_pair() -> tuple:
    return kernels.get_ops("torch"), kernels.get_ops("triton")


def run_with_grads(
    fn: Callable[..., Tensor | tuple], inputs: Sequence[Tensor | object], upstream: Sequence[Tensor | None]
) -> tuple[tuple, list[Tensor | None]]:
    """Call fn on fresh leaf copies of the float inputs, backprop `upstream` into its float outputs,
    and return (outputs, grads of the float inputs)."""
    leaves = [x.detach().clone().requires_grad_() if _is_float(x) else x for x in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(out, up) for out, up in zip(outputs, upstream) if up is not None]
    torch.autograd.backward([out for out, _ in pairs], [up for _, up in pairs])
    return outputs, [x.grad for x in leaves if _is_float(x)]


def _is_float(x: object) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


@pytest.fixture
def with_grads() -> Callable:
    return run_with_grads


def _moe_layer(ops, x, w_router, ffn, noise, groups, capacity_factor, batch_priority, padding):
    """Top-1 MoE layer from the five ops, as limoe/moe.py composes them: x [T, d] → (y [T, d], probs [T, E])."""
    tokens, d = x.shape
    num_experts = w_router.shape[1]
    size = tokens // groups
    capacity = math.ceil(capacity_factor * size / num_experts)
    probs, expert, gate = ops.top1_router(x @ w_router, noise)  # [T, E], [T], [T]
    expert = expert.masked_fill(padding, -1)
    slot = ops.assign_slots(expert.view(groups, size), gate.view(groups, size), num_experts, capacity, batch_priority)
    group = torch.arange(groups, device=x.device)[:, None]  # [G, 1]
    row = torch.where(slot >= 0, expert.view(groups, size) * (groups * capacity) + group * capacity + slot, -1)
    num_rows = num_experts * groups * capacity
    buf = ops.dispatch(x, row.view(tokens), num_rows).view(num_experts, groups * capacity, d)
    out = ops.expert_ffn(buf, *ffn)  # [E, G·C, d]
    return ops.combine(out.view(num_rows, d), row.view(tokens), gate), probs


def _layer_inputs(device, tokens=96, d=24, hidden=40, num_experts=5):
    x = torch.randn(tokens, d, device=device)
    w_router = torch.randn(d, num_experts, device=device) / d**0.5
    ffn = [
        torch.randn(num_experts, d, hidden, device=device) / d**0.5,
        torch.randn(num_experts, hidden, device=device) / 10,
        torch.randn(num_experts, hidden, d, device=device) / hidden**0.5,
        torch.randn(num_experts, d, device=device) / 10,
    ]
    noise = torch.randn(tokens, num_experts, device=device) / num_experts
    padding = torch.zeros(tokens, dtype=torch.bool, device=device)
    padding[-7:] = True
    return [x, w_router, *ffn], noise, padding


@pytest.fixture
def moe_layer() -> Callable:
    return _moe_layer


@pytest.fixture
def layer_inputs() -> Callable:
    return _layer_inputs
