"""Dispatch: copy each kept token into its row of the expert-major buffer.

Math: buf[row[t]] = x[t] for every token with row[t] ≥ 0; rows nobody fills stay zero.
Backward: dx[t] = dbuf[row[t]] (zero for dropped tokens). Rows are unique, so no atomics.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dispatch_reference(x: Tensor, row: Tensor, num_rows: int) -> Tensor:
    """Plain PyTorch: x [T, d], row [T] int64 (−1 = dropped) → buf [num_rows, d]."""
    kept = row >= 0
    buf = x.new_zeros(num_rows, x.shape[1])
    return buf.index_copy(0, row[kept], x[kept])
