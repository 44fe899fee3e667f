"""Top-1 router: softmax over all experts, argmax of the noisy logits, the chosen gate.

Math (V-MoE's noisy top-1 router): given logits ℓ = x·W of shape [T, E] and, in training, noise
n ~ N(0, (1/E)²):
    probs  = softmax(ℓ)              clean routing distribution (auxiliary losses read it)
    expert = argmax(ℓ + n)           lowest index wins a tie
    gate   = softmax(ℓ + n)[expert]  the combine weight; not renormalised
The logits come from a cuBLAS matmul outside; this op is the row-wise part after it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top1_router_reference(logits: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Plain PyTorch: logits [T, E] (+ noise [T, E]) → probs [T, E] fp32, expert [T] int64, gate [T] fp32."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    noisy_probs = probs if noise is None else torch.softmax(logits + noise.float(), dim=-1)
    expert = noisy_probs.argmax(dim=-1)  # [T]
    gate = noisy_probs.gather(-1, expert[:, None]).squeeze(-1)  # [T]
    return probs, expert, gate
