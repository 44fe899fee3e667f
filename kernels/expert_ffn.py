"""Expert feed-forward on the expert-major buffer: GELU MLP per expert, batched.

Math: for each expert e, out[e] = GELU(buf[e] · W_in[e] + b_in[e]) · W_out[e] + b_out[e].
Every expert holds the same number of slots (its capacity per group × groups), so this is two
batched matmuls; cuBLAS does them at dense-GEMM speed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_ffn_reference(buf: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """buf [E, N, d], w_in [E, d, h], b_in [E, h], w_out [E, h, d], b_out [E, d] → [E, N, d]."""
    hidden = torch.nn.functional.gelu(torch.baddbmm(b_in[:, None, :], buf, w_in))  # [E, N, h]
    return torch.baddbmm(b_out[:, None, :], hidden, w_out)  # [E, N, d]
