"""The op sets as the MoE layer uses them: get_ops, the whole top-1 layer from either backend
(values and gradients to x, router weights and expert weights, through the output and every loss
term), torch.compile and op registration."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import limoe_kernels
from tests.child_env import child_env

OP_NAMES = ("top1_router", "assign_slots", "dispatch", "combine", "expert_ffn", "moe_layer")
TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # the grouped GEMMs round differently from the reference (see their test)


def test_get_ops_namespaces():
    for backend in ("torch", "triton"):
        assert all(callable(getattr(limoe_kernels.get_ops(backend), name)) for name in OP_NAMES)
    with pytest.raises(ValueError, match="unknown"):
        limoe_kernels.get_ops("cuda")


# 24 tokens per group over 5 experts: capacity 5 ≈ c 1.0, 2 drops many, 8 drops almost none
@pytest.mark.parametrize("capacity, batch_priority", [(5, True), (2, True), (8, False)])
def test_layer_matches_reference(device, with_grads, ops_pair, moe_layer, layer_inputs, capacity, batch_priority):
    inputs, noise, modality = layer_inputs(device)
    reference, triton_ops = ops_pair

    def layer(ops):
        return lambda x, w, *ffn: moe_layer(ops, x, w, ffn, noise, modality, 24, capacity, batch_priority)

    upstream = [torch.randn_like(out) for out in layer(reference)(*inputs)]  # y and every loss term

    outputs, grads = with_grads(layer(triton_ops), inputs, upstream)
    outputs_ref, grads_ref = with_grads(layer(reference), inputs, upstream)
    for out, out_ref in zip(outputs, outputs_ref):
        torch.testing.assert_close(out, out_ref, **TOLERANCE)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, **TOLERANCE)
    assert all(grad.abs().sum() > 0 for grad in grads)  # every parameter is reached


def test_layer_returns_the_plan_and_statistics_of_the_reference(device, ops_pair, layer_inputs):
    inputs, noise, modality = layer_inputs(device)
    x, w, *ffn = inputs
    got, want = (ops.moe_layer(x, w, noise, modality, *ffn, 24, 2, None, 3, True) for ops in ops_pair)
    assert torch.equal(got.slot, want.slot) and torch.equal(got.router.expert, want.router.expert)
    assert (got.y[got.slot.view(-1) < 0] == 0).all()  # dropped and padding tokens get exactly zero
    for name in ("gate", "routed", "prob_sum", "entropy_sum"):
        torch.testing.assert_close(getattr(got.router, name), getattr(want.router, name), msg=name)
    torch.testing.assert_close(got.kept, want.kept)


def test_layer_under_torch_compile(device, with_grads, ops_pair, moe_layer, layer_inputs):
    """Fake kernels and backward ops let torch.compile trace the layer in one graph, backward too."""
    inputs, noise, modality = layer_inputs(device)
    _, triton_ops = ops_pair

    def layer(x, w, *ffn):
        return moe_layer(triton_ops, x, w, ffn, noise, modality, 24, 5, True)

    upstream = [torch.randn_like(out) for out in layer(*inputs)]

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    outputs, grads = with_grads(compiled, inputs, upstream)
    outputs_ref, grads_ref = with_grads(layer, inputs, upstream)
    for got, want in zip([*outputs, *grads], [*outputs_ref, *grads_ref]):
        torch.testing.assert_close(got, want)


def _opcheck_cases(device):
    x = torch.randn(20, 6, device=device, requires_grad=True)
    w = torch.randn(5, 6, device=device, requires_grad=True)
    modality = torch.randint(-1, 2, (20,), device=device)
    row = torch.tensor([3, -1, 0, 7, 5, -1], device=device)
    expert = torch.randint(-1, 4, (2, 10), device=device)
    ffn_shapes = ((2, 5, 8), (2, 16, 8), (2, 16), (2, 8, 16), (2, 8))
    ffn = [torch.randn(shape, device=device, requires_grad=True) for shape in ffn_shapes]
    layer_ffn = [torch.randn((5, *shape[1:]), device=device, requires_grad=True) for shape in ffn_shapes[1:]]
    layer_x = torch.randn(20, 8, device=device, requires_grad=True)
    return {
        "top1_router": (limoe_kernels.router._top1_router, (x, w, torch.randn(20, 5, device=device), modality, 4, 2, 0.2)),
        "assign_slots": (limoe_kernels.slots._assign_slots, (expert, torch.rand(2, 10, device=device), expert, 4, 2,
                                                             True, 1)),
        "dispatch": (limoe_kernels.dispatch.dispatch, (torch.randn(6, 9, device=device, requires_grad=True), row, 8)),
        "combine": (
            limoe_kernels.combine.combine,
            (torch.randn(8, 9, device=device, requires_grad=True), row, torch.rand(6, device=device).requires_grad_()),
        ),
        # Rows past a slab's count and tokens no expert kept are left unwritten in some outputs
        # (unspecified values), so these cases fill every row: full slabs, no drops, no padding.
        "expert_ffn": (limoe_kernels.expert_ffn._expert_ffn, [ffn[0], torch.tensor([[5], [5]], device=device), *ffn[1:]]),
        "moe_layer": (limoe_kernels.layer._moe_layer,
                      (layer_x, torch.randn(5, 8, device=device, requires_grad=True), torch.randn(20, 5, device=device),
                       modality.abs(), *layer_ffn, 10, 2, 0.2, 12, True)),
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
    script = ("import torchvision, torch, limoe_kernels; "
              "limoe_kernels.get_ops('triton').top1_router(torch.randn(8, 4), torch.randn(3, 4))")
    env = child_env(drop=("TRITON_INTERPRET",))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1" in result.stderr.splitlines()[-1]
