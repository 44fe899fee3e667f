"""Dense building blocks of the tower: attention, the MLP, and the pooling heads.

Attention uses `scaled_dot_product_attention` so the fused flash/memory-efficient kernels apply
on GPU. Every module here is shared by both modalities; only the pooling heads come in pairs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention over one modality's sequences (never across examples)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.prompts: Optional[nn.Module] = None  # prompt tuning's DeepPrompts (limoe.model.prompts), if attached

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """x [B, N, d]; key_mask [B, N] bool, True where a token may be attended to."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3×[B, h, N, d/h]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, N]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, N, d/h]
        if self.prompts is not None:
            y = y + self.prompts(q, self.qkv)  # gated attention over learned prompt tokens, [B, h, N, d/h]
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    """The ViT feed-forward block, d → h → d with exact GELU; also the dense twin of an expert."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MapHead(nn.Module):
    """Multihead attention pooling (as in ViT/SigLIP): a learned probe attends over the tokens."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.mlp = Mlp(width, hidden)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """x [B, N, d] → [B, d]."""
        probe = self.probe.expand(x.shape[0], -1, -1)  # [B, 1, d]
        padding = None if key_mask is None else ~key_mask
        pooled = self.attention(probe, x, x, key_padding_mask=padding, need_weights=False)[0]  # [B, 1, d]
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


class Pool(nn.Module):
    """Turn one modality's final tokens into one vector: `map`, `cls` (token 0), `mean` or `eos`.

    `eos` picks the end-of-text token, which has the highest id in open_clip's vocabulary.
    """

    def __init__(self, kind: str, width: int, heads: int, hidden: int):
        super().__init__()
        self.kind = kind
        self.map = MapHead(width, heads, hidden) if kind == "map" else None

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None, tokens: Optional[Tensor] = None) -> Tensor:
        """x [B, N, d], key_mask [B, N] (True = real token), tokens [B, N] ids → [B, d]."""
        if self.kind == "map":
            return self.map(x, key_mask)
        if self.kind == "cls":
            return x[:, 0]
        if self.kind == "eos":
            return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        if key_mask is None:
            return x.mean(dim=1)
        weights = key_mask.to(x.dtype)[..., None]  # [B, N, 1]
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
