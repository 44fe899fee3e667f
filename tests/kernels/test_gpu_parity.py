"""bf16 parity of the compiled Triton kernels on a CUDA GPU, at sizes the interpreter cannot afford.

Selected with `pytest -m gpu`; skipped without a GPU. Index outputs must match exactly; float
outputs are held to the reference's own bf16 error: both are compared with an fp32 computation on
the same bf16 inputs, and the kernels may be at most a little worse than the reference.
"""

from __future__ import annotations

import pytest
import torch

import limoe_kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TORCH, TRITON = limoe_kernels.get_ops("torch"), limoe_kernels.get_ops("triton")


def _rel_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


def _assert_parity(got, ref_bf16, exact_fp32):
    """The kernel's error against fp32 is at most 1.5× the bf16 reference's, plus a bf16 ulp."""
    assert _rel_error(got, exact_fp32) <= 1.5 * _rel_error(ref_bf16, exact_fp32) + 4e-3


def _grads(fn, inputs, upstream, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(list(outputs), [u.to(out.dtype) for out, u in zip(outputs, upstream)])
    return outputs, [x.grad for x in leaves]


def test_router_bf16():
    """bf16 tokens, fp32 master weights, the GEMM in bf16 with fp32 accumulation on both sides:
    choices and loss terms agree; dx and dW hold the reference's bf16 error."""
    x = torch.randn(65536, 768, device="cuda")
    w = torch.randn(32, 768, device="cuda") / 768**0.5
    noise = torch.randn(65536, 32, device="cuda") / 32
    modality = torch.randint(-1, 2, (65536,), device="cuda")
    got = TRITON.top1_router(x.bfloat16(), w, noise, modality, 2048, 2)
    want = TORCH.top1_router(x.bfloat16(), w, noise, modality, 2048, 2)
    assert (got.expert == want.expert).float().mean() > 0.9999  # near-ties aside
    for name in ("gate", "importance", "z", "token_entropy", "marginal_entropy", "prob_sum", "entropy_sum"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-3, atol=1e-3, msg=name)
    torch.testing.assert_close(got.load, want.load, rtol=1e-2, atol=1e-3)  # a flipped winner moves it

    def differentiable(router):
        def run(x, w):
            out = router(x, w.float(), noise, modality, 2048, 2)
            return out.gate, out.importance, out.load, out.token_entropy, out.marginal_entropy
        return run

    upstream = [torch.randn_like(v) for v in differentiable(TORCH.top1_router)(x, w)]
    exact = _grads(differentiable(TORCH.top1_router), [x, w], upstream, torch.float32)
    ref = _grads(differentiable(TORCH.top1_router), [x, w], upstream, torch.bfloat16)
    got = _grads(differentiable(TRITON.top1_router), [x, w], upstream, torch.bfloat16)
    for g, r, e in zip(got[1], ref[1], exact[1]):
        _assert_parity(g, r, e)


@pytest.mark.parametrize("groups, size, num_experts", [(32, 2048, 8), (1, 65536, 32), (16, 4096, 64)])
def test_slots_large(groups, size, num_experts):
    expert = torch.randint(-1, num_experts, (groups, size), device="cuda")
    gate = torch.rand(groups, size, device="cuda").bfloat16()  # bf16: many exact ties
    modality = torch.where(expert < 0, -1, torch.randint(0, 2, (groups, size), device="cuda"))
    capacity = size // num_experts
    for batch_priority in (True, False):
        got = TRITON.assign_slots(expert, gate, modality, num_experts, capacity, batch_priority, 2)
        want = TORCH.assign_slots(expert, gate, modality, num_experts, capacity, batch_priority, 2)
        for name, g, w in zip(got._fields, got, want):
            assert torch.equal(g, w), name


def test_dispatch_combine_bf16():
    tokens, d, num_rows = 16384, 1280, 20480
    x = torch.randn(tokens, d, device="cuda").bfloat16()
    row = torch.randperm(num_rows, device="cuda")[:tokens]
    row = torch.where(torch.rand(tokens, device="cuda") < 0.1, -1, row)
    assert torch.equal(TRITON.dispatch(x, row, num_rows), TORCH.dispatch(x, row, num_rows))
    buf = torch.randn(num_rows, d, device="cuda")
    gate = torch.rand(tokens, device="cuda")
    dy = torch.randn(tokens, d, device="cuda")
    exact = _grads(lambda b, g: TORCH.combine(b, row, g), [buf, gate], [dy], torch.float32)
    ref = _grads(lambda b, g: TORCH.combine(b.bfloat16(), row, g), [buf, gate], [dy], torch.float32)
    got = _grads(lambda b, g: TRITON.combine(b.bfloat16(), row, g), [buf, gate], [dy], torch.float32)
    for g, r, e in zip([*got[0], *got[1]], [*ref[0], *ref[1]], [*exact[0], *exact[1]]):
        _assert_parity(g, r, e)


def test_expert_ffn_bf16():
    e, n, d, h = 8, 2048, 768, 3072
    counts = torch.tensor([[2048], [0], [1000], [2047], [1], [129], [2048], [700]], device="cuda")
    filled = (torch.arange(n, device="cuda") < counts)[..., None]  # [E, N, 1]
    inputs = [torch.randn(e, n, d, device="cuda") * filled, torch.randn(e, h, d, device="cuda") / d**0.5,
              torch.randn(e, h, device="cuda") / 10, torch.randn(e, d, h, device="cuda") / h**0.5,
              torch.randn(e, d, device="cuda") / 10]
    dout = [torch.randn(e, n, d, device="cuda") * filled]

    def ffn(op):
        return lambda buf, *w: op(buf, counts, *w)

    exact = _grads(ffn(TORCH.expert_ffn), inputs, dout, torch.float32)
    ref = _grads(ffn(TORCH.expert_ffn), inputs, dout, torch.bfloat16)
    got = _grads(ffn(TRITON.expert_ffn), inputs, dout, torch.bfloat16)
    rows = filled.expand(e, n, d)
    for index, (g, r, x) in enumerate(zip([*got[0], *got[1]], [*ref[0], *ref[1]], [*exact[0], *exact[1]])):
        if index in (0, 1):  # out and dbuf: the filled rows only
            g, r, x = g[rows], r[rows], x[rows]
        _assert_parity(g, r, x)


def test_layer_bf16(moe_layer, layer_inputs):
    inputs, noise, modality = layer_inputs("cuda", tokens=8192, d=256, hidden=1024, num_experts=8)

    def layer(ops):
        return lambda x, w, *ffn: moe_layer(ops, x, w.float(), ffn, noise, modality, 1024, 160, True)  # c = 1.25

    upstream = [torch.randn_like(out, dtype=torch.float32) for out in layer(TORCH)(*inputs)]

    ref = _grads(layer(TORCH), inputs, upstream, torch.bfloat16)
    got = _grads(layer(TRITON), inputs, upstream, torch.bfloat16)
    exact = _grads(layer(TORCH), inputs, upstream, torch.float32)
    for g, r, x in zip([*got[0], *got[1]], [*ref[0], *ref[1]], [*exact[0], *exact[1]]):
        _assert_parity(g, r, x)
