"""The op sets as the MoE layer uses them: get_ops, a whole top-1 layer built from either backend
(values and gradients to x, router weights and expert weights), torch.compile and op registration."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import limoe_kernels

OP_NAMES = ("top1_router", "assign_slots", "dispatch", "combine", "expert_ffn")
TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # the expert FFN rounds differently from the reference (see its test)


def test_get_ops_namespaces():
    for backend in ("torch", "triton"):
        assert all(callable(getattr(limoe_kernels.get_ops(backend), name)) for name in OP_NAMES)
    with pytest.raises(ValueError, match="unknown"):
        limoe_kernels.get_ops("cuda")


# 24 tokens per group over 5 experts: capacity 5 ≈ c 1.0, 2 drops many, 8 drops almost none
@pytest.mark.parametrize("capacity, batch_priority", [(5, True), (2, True), (8, False)])
def test_layer_matches_reference(device, with_grads, ops_pair, moe_layer, layer_inputs, capacity, batch_priority):
    inputs, noise, padding = layer_inputs(device)
    reference, triton_ops = ops_pair

    def layer(ops):
        return lambda x, w, *ffn: moe_layer(ops, x, w, ffn, noise, 4, capacity, batch_priority, padding)

    upstream = [torch.randn_like(out) for out in layer(reference)(*inputs)]  # y, probs, gate, the sums

    outputs, grads = with_grads(layer(triton_ops), inputs, upstream)
    outputs_ref, grads_ref = with_grads(layer(reference), inputs, upstream)
    for out, out_ref in zip(outputs, outputs_ref):
        torch.testing.assert_close(out, out_ref, **TOLERANCE)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, **TOLERANCE)
    assert all(grad.abs().sum() > 0 for grad in grads)  # every parameter is reached


def test_layer_under_torch_compile(device, with_grads, ops_pair, moe_layer, layer_inputs):
    """Fake kernels and backward ops let torch.compile trace the layer in one graph, backward too."""
    inputs, noise, padding = layer_inputs(device)
    _, triton_ops = ops_pair

    def layer(x, w, *ffn):
        return moe_layer(triton_ops, x, w, ffn, noise, 4, 5, True, padding)

    upstream = [torch.randn_like(out) for out in layer(*inputs)]

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    outputs, grads = with_grads(compiled, inputs, upstream)
    outputs_ref, grads_ref = with_grads(layer, inputs, upstream)
    for got, want in zip([*outputs, *grads], [*outputs_ref, *grads_ref]):
        torch.testing.assert_close(got, want)


def _opcheck_cases(device):
    logits = torch.randn(20, 5, device=device, requires_grad=True)
    row = torch.tensor([3, -1, 0, 7, 5, -1], device=device)
    expert = torch.randint(-1, 4, (2, 10), device=device)
    ffn_shapes = ((2, 5, 8), (2, 8, 16), (2, 16), (2, 16, 8), (2, 8))
    return {
        "top1_router": (
            limoe_kernels.router._top1_router,
            (logits, torch.randn(20, 5, device=device), torch.randint(-1, 2, (20,), device=device), 4, 2, 0.2),
        ),
        "assign_slots": (limoe_kernels.slots.assign_slots, (expert, torch.rand(2, 10, device=device), 4, 2, True)),
        "dispatch": (limoe_kernels.dispatch.dispatch, (torch.randn(6, 9, device=device, requires_grad=True), row, 8)),
        "combine": (
            limoe_kernels.combine.combine,
            (torch.randn(8, 9, device=device, requires_grad=True), row, torch.rand(6, device=device).requires_grad_()),
        ),
        "expert_ffn": (
            limoe_kernels.expert_ffn._expert_ffn_with_pre,
            [torch.randn(shape, device=device, requires_grad=True) for shape in ffn_shapes],
        ),
    }


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_registration(device, name):
    """torch.library.opcheck: schema, fake kernels, autograd registration and AOT tracing agree."""
    op, args = _opcheck_cases(device)[name]
    torch.library.opcheck(op, args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter's import order")
def test_triton_imported_before_the_interpreter_is_a_clear_error():
    """torchvision imports triton (through torch._dynamo) before `limoe_kernels` can switch the
    interpreter on; the Triton ops then refuse CPU tensors with the fix instead of failing deep
    inside a kernel."""
    script = "import torchvision, torch, limoe_kernels; limoe_kernels.get_ops('triton').top1_router(torch.randn(8, 4))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1" in result.stderr.splitlines()[-1]
