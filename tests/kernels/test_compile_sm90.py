"""Every kernel launch of a bf16 forward+backward of the layer (and of the expert-parallel ops)
compiles for an H100 (sm_90).

The interpreter runs the kernels as Python, so it cannot catch what only the GPU compiler rejects
(types, layouts, register spills aside). This test needs no GPU: a child process with the
interpreter off runs the layer on CPU tensors with every Triton launch recorded instead of made,
then compiles each distinct (kernel, argument types, constexprs) ahead of time for sm_90,
ptxas included, and fails if any of them does not compile.
"""

from __future__ import annotations

import os
import subprocess
import sys


def test_layer_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
    assert "compiled" in child.stdout


def _triton_type(arg) -> str:
    import torch

    if isinstance(arg, torch.Tensor):
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}
        return "*" + names[arg.dtype]
    if isinstance(arg, float):
        return "fp32"
    return "i32" if -(2**31) <= arg < 2**31 else "i64"


LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _record_launches() -> dict:
    """Run the layer (bf16, BPR and vanilla, with and without noise) and the expert-parallel ops
    with every launch recorded, not made."""
    import torch
    from triton.runtime.jit import JITFunction

    import limoe_kernels
    import limoe_kernels._launch

    launches = {}

    def record(kernel, _grid):
        def launch(*args, **keywords):
            constexprs = {k: v for k, v in keywords.items() if k not in LAUNCH_OPTIONS}
            options = {k: v for k, v in keywords.items() if k in LAUNCH_OPTIONS}
            signature = {name: _triton_type(arg) for name, arg in zip(kernel.arg_names, args)}
            signature.update({name: "constexpr" for name in constexprs})
            launches[(kernel.fn.__name__, str(signature), str(constexprs))] = (kernel, signature, constexprs, options)

        return launch

    JITFunction.__getitem__ = record
    limoe_kernels._launch.interpreting = lambda: True  # let the launchers accept CPU tensors
    limoe_kernels._launch._interpreter_ready = lambda: True
    ops = limoe_kernels.get_ops("triton")
    x = torch.randn(256, 64, dtype=torch.bfloat16, requires_grad=True)
    w_router = torch.randn(8, 64, requires_grad=True)  # fp32 master weights, as under autocast
    shapes = ((8, 96, 64), (8, 96), (8, 64, 96), (8, 64))
    ffn = [torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for shape in shapes]
    modality = torch.where(torch.arange(256) % 7 == 0, -1, torch.arange(256) % 2)
    for noise, batch_priority in ((torch.randn(256, 8), True), (None, False)):
        out = ops.moe_layer(x, w_router, noise, modality, *ffn, 64, 2, None, 12, batch_priority)
        outputs = [out.y, out.router.importance, out.router.load, out.router.z, out.router.token_entropy,
                   out.router.marginal_entropy]
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    # The expert-parallel composition: the router on its own, the exchange buffer's FFN, dispatch, combine.
    router = ops.top1_router(x, w_router, None, modality, 64, 2)
    row = torch.randperm(512)[:256]
    buf = ops.dispatch(x, row, 512).view(8, 64, 64)
    local = ops.expert_ffn(buf, torch.full((8, 2), 20), *ffn)
    y = ops.combine(local.view(512, 64), row, router.gate)
    torch.autograd.backward([y, router.importance], [torch.ones_like(y), torch.ones(())])
    return launches


def _compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = _record_launches()
    target = GPUTarget("cuda", 90, 32)
    for kernel, signature, constexprs, options in launches.values():
        triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
    names = sorted({kernel.fn.__name__ for kernel, _, _, _ in launches.values()})
    print(f"compiled {len(launches)} launches of {len(names)} kernels for sm_90: {', '.join(names)}")


if __name__ == "__main__":
    _compile_all()
