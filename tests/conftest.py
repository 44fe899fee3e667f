"""Import `limoe_kernels` before any test module imports torchvision or open_clip (which import triton
through torch._dynamo), so that on a machine without CUDA Triton's interpreter is on from the
start and the Triton ops run on CPU tensors in every test, whatever the collection order."""

import limoe_kernels  # noqa: F401
