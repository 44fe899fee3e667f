"""Combine: read each kept token's expert output back and scale it by its gate.

Math: y[t] = gate[t] · buf[row[t]] for row[t] ≥ 0, else 0 (a dropped token gets nothing from the
MoE layer and carries on through the residual).
Backward: dbuf[row[t]] = gate[t] · dy[t];  dgate[t] = ⟨dy[t], buf[row[t]]⟩.
"""

from __future__ import annotations

import torch
from torch import Tensor


def combine_reference(buf: Tensor, row: Tensor, gate: Tensor) -> Tensor:
    """Plain PyTorch: buf [R, d], row [T] int64 (−1 = dropped), gate [T] → y [T, d]."""
    kept = (row >= 0)[:, None]  # [T, 1]
    picked = buf.index_select(0, row.clamp(min=0))  # [T, d]
    return torch.where(kept, picked * gate[:, None].to(buf.dtype), 0.0)
