"""Dense building blocks of the tower: attention, the MLP, and the pooling heads.

Attention uses `scaled_dot_product_attention` so the fused flash/memory-efficient kernels apply
on GPU; it attends within segments of the joint sequence, so image and text never mix. Every
module here is shared by both modalities; only the pooling heads come in pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Segment:
    """A run of one modality's tokens in the tower's joint sequence: attention stays inside it."""

    start: int
    length: int
    key_mask: Optional[Tensor] = None  # [B, length] True where a token may be attended to (None: everywhere)


class _SegmentHeads(torch.autograd.Function):
    """qkv [B, N, 3d] → (q, k, v) [B, h, n, d/h] of every segment, as views.

    Autograd would join the gradients of those views twice, stacking q, k, v per segment and then
    concatenating the segments; the backward here writes each piece straight into its place of
    one d(qkv) instead, which the projection's backward reads as it is."""

    @staticmethod
    def forward(ctx, qkv: Tensor, lengths: tuple[int, ...], heads: int) -> tuple[Tensor, ...]:
        ctx.lengths, ctx.heads = lengths, heads
        return tuple(piece for chunk in _per_segment(qkv, lengths, heads) for piece in chunk.unbind(0))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        like = next(g for g in grads if g is not None)
        batch, length = like.shape[0], sum(ctx.lengths)
        dqkv = like.new_empty(batch, length, 3 * ctx.heads * like.shape[-1])  # [B, N, 3d]
        pieces = (piece for chunk in _per_segment(dqkv, ctx.lengths, ctx.heads) for piece in chunk.unbind(0))
        for piece, grad in zip(pieces, grads):
            piece.copy_(grad) if grad is not None else piece.zero_()
        return dqkv, None, None


def _per_segment(qkv: Tensor, lengths: tuple[int, ...], heads: int) -> list[Tensor]:
    """qkv [B, N, 3d] → per segment a [3, B, h, n, d/h] view."""
    batch, start, chunks = qkv.shape[0], 0, []
    for length in lengths:
        chunks.append(qkv[:, start: start + length].view(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4))
        start += length
    return chunks


class Attention(nn.Module):
    """Multi-head self-attention over each segment of the sequence (never across segments or examples)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.prompts: Optional[nn.Module] = None  # prompt tuning's DeepPrompts (limoe.model.prompts), if attached

    def forward(self, x: Tensor, segments: Sequence[Segment] = ()) -> Tensor:
        """x [B, N, d] → [B, N, d]. The projections run once over all N tokens, attention per
        segment (consecutive, covering the sequence; none: the whole sequence is one)."""
        batch, length, width = x.shape
        segments = segments or (Segment(0, length),)
        heads = _SegmentHeads.apply(self.qkv(x), tuple(s.length for s in segments), self.heads)  # 3 per segment
        parts = []
        for index, segment in enumerate(segments):
            q, k, v = heads[3 * index: 3 * index + 3]  # [B, h, n, d/h]
            mask = None if segment.key_mask is None else segment.key_mask[:, None, None, :]  # [B, 1, 1, n]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, n, d/h]
            if self.prompts is not None:
                y = y + self.prompts(q, self.qkv)  # gated attention over learned prompt tokens, [B, h, n, d/h]
            parts.append(y.transpose(1, 2))  # [B, n, h, d/h]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [B, N, h, d/h]
        return self.out(y.reshape(batch, length, width))


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
