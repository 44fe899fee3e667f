"""Kernel tests run the Triton ops on CUDA when there is a GPU, else on CPU in Triton's interpreter.

Importing `kernels` turns the interpreter on where CUDA is missing, before any kernel is defined
(see kernels/__init__.py), so these tests do not depend on which test module imports it first.
On CPU they stay fp32 and small: the interpreter emulates bf16 wrongly and costs milliseconds per
tile. bf16 parity is checked on a GPU only (tests marked `gpu`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from torch import Tensor

import limoe_kernels
from limoe_kernels._launch import interpreting
from limoe_kernels.router import DIFFERENTIABLE

LOSS_TERMS = [name for name in DIFFERENTIABLE if name != "gate"]  # the layer's differentiable router outputs


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
    return limoe_kernels.get_ops("torch"), limoe_kernels.get_ops("triton")


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


def _layer_inputs(device, tokens=96, d=24, hidden=40, num_experts=5):
    """([x, w_router, w_in, b_in, w_out, b_out], noise, modality): image and text mixed, the last
    7 tokens padding; Linear layout (w_router [E, d], w_in [E, h, d], w_out [E, d, h])."""
    x = torch.randn(tokens, d, device=device)
    w_router = torch.randn(num_experts, d, device=device) / d**0.5
    ffn = [
        torch.randn(num_experts, hidden, d, device=device) / d**0.5,
        torch.randn(num_experts, hidden, device=device) / 10,
        torch.randn(num_experts, d, hidden, device=device) / hidden**0.5,
        torch.randn(num_experts, d, device=device) / 10,
    ]
    noise = torch.randn(tokens, num_experts, device=device) / num_experts
    modality = torch.randint(0, 2, (tokens,), device=device)
    modality[-7:] = -1
    return [x, w_router, *ffn], noise, modality


def _layer_outputs(ops, x, w_router, ffn, noise, modality, group_size, capacity, batch_priority=True,
                   num_modalities=2) -> tuple[Tensor, ...]:
    """`ops.moe_layer`, flattened to its differentiable outputs: y and the router's loss terms, so
    a test can send a gradient into each."""
    out = ops.moe_layer(x, w_router, noise, modality, *ffn, group_size, num_modalities, None, capacity, batch_priority)
    return (out.y, *(getattr(out.router, name) for name in LOSS_TERMS))


@pytest.fixture
def moe_layer() -> Callable:
    """The whole layer from an op set, with flattened outputs."""
    return _layer_outputs


@pytest.fixture
def layer_inputs() -> Callable:
    return _layer_inputs
