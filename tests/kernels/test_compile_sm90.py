"""Every kernel launch of a bf16 forward+backward of the layer compiles for an H100 (sm_90).

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
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32"}
        return "*" + names[arg.dtype]
    return "i32" if -(2**31) <= arg < 2**31 else "i64"


def _record_launches() -> dict:
    """Run the layer (bf16, BPR and vanilla, with and without noise) with launches recorded, not made."""
    import torch
    from triton.runtime.jit import JITFunction

    import limoe_kernels
    import limoe_kernels._launch
    from limoe_kernels.layer import top1_moe_layer

    launches = {}

    def record(kernel, _grid):
        def launch(*args, **constexprs):
            signature = {name: _triton_type(arg) for name, arg in zip(kernel.arg_names, args)}
            signature.update({name: "constexpr" for name in constexprs})
            launches[(kernel.fn.__name__, str(signature), str(constexprs))] = (kernel, signature, constexprs)

        return launch

    JITFunction.__getitem__ = record
    limoe_kernels._launch.interpreting = lambda: True  # let the launchers accept CPU tensors
    limoe_kernels._launch._interpreter_ready = lambda: True
    ops = limoe_kernels.get_ops("triton")
    x = torch.randn(256, 64, dtype=torch.bfloat16, requires_grad=True)
    w_router = torch.randn(64, 8, dtype=torch.bfloat16, requires_grad=True)
    shapes = ((8, 64, 96), (8, 96), (8, 96, 64), (8, 64))
    ffn = [torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for shape in shapes]
    for noise, batch_priority in ((torch.randn(256, 8), True), (None, False)):
        padding = torch.arange(256) % 7 == 0
        y, router = top1_moe_layer(ops, x, w_router, ffn, noise, 4, 12, batch_priority, padding)
        outputs = [y, router.probs, router.prob_sum, router.load_sum, router.entropy_sum, router.z_sum]
        torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])
    return launches


def _compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = _record_launches()
    target = GPUTarget("cuda", 90, 32)
    for kernel, signature, constexprs in launches.values():
        triton.compile(ASTSource(kernel, signature, constexprs), target=target)
    names = sorted({kernel.fn.__name__ for kernel, _, _ in launches.values()})
    print(f"compiled {len(launches)} launches of {len(names)} kernels for sm_90: {', '.join(names)}")


if __name__ == "__main__":
    _compile_all()
