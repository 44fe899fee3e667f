"""The training-only parts masked pretraining adds around the shared tower; exports drop them all.

`PixelDecoder` is MAE's light decoder (of an image's pixels, or AudioMAE's of a clip's log-mel
patches), `MlmHead` BERT's output layer (tied to the token embedding), `CrossAttentionFusion` the
bimodal stage's fusion. The fusion sits between the tower
and the heads, so the tower computes at inference exactly what it computed in training; OmniVec2
puts its fusion between two transformers and removes it at inference, which a single tower
without a second transformer has no place for.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pre_ln_blocks(layer: type[nn.Module], depth: int, width: int, heads: int, hidden: int) -> nn.ModuleList:
    """`depth` of torch's pre-LN transformer layers (GELU MLP, no dropout), as the tower's blocks."""
    return nn.ModuleList(
        layer(width, heads, hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        for _ in range(depth)
    )


class PixelDecoder(nn.Module):
    """MAE's decoder: the encoder's visible tokens are put back at their places among learned mask
    tokens, given the decoder's own position embeddings, run through a few narrow blocks, and
    mapped to each patch's values (pixels, or log-mel values). It sees every position; the encoder
    saw only the visible ones."""

    def __init__(self, width: int, decoder_width: int, depth: int, heads: int, num_patches: int, patch_pixels: int):
        super().__init__()
        self.project_in = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.randn(decoder_width) * 0.02)
        self.positions = nn.Parameter(torch.randn(num_patches, decoder_width) * 0.02)  # [N, d_dec]
        self.blocks = _pre_ln_blocks(nn.TransformerEncoderLayer, depth, decoder_width, heads, 4 * decoder_width)
        self.norm = nn.LayerNorm(decoder_width)
        self.predict = nn.Linear(decoder_width, patch_pixels)

    def forward(self, visible: Tensor, keep: Tensor) -> Tensor:
        """visible [B, K, d] tokens of the patches keep [B, K] → predicted values [B, N, P] (P = p·p·3 pixels)."""
        batch, _, _ = visible.shape
        x = self.project_in(visible)  # [B, K, d_dec]
        full = self.mask_token.to(x.dtype).expand(batch, *self.positions.shape)  # [B, N, d_dec]
        x = full.scatter(1, keep[..., None].expand_as(x), x) + self.positions
        for block in self.blocks:
            x = block(x)
        return self.predict(self.norm(x))


class MlmHead(nn.Module):
    """BERT's output layer: dense + GELU + LayerNorm, then scores against the token embedding table
    (the output weights are the input embedding's, tied) plus a bias per token."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, token_embedding: Tensor) -> Tensor:
        """x [T, d] tokens to predict, token_embedding [V, d] → logits [T, V]."""
        return F.linear(self.norm(F.gelu(self.transform(x))), token_embedding, self.bias)


class CrossAttentionFusion(nn.Module):
    """OmniVec2's pair fusion: one modality's tokens attend to the other's, through pre-LN blocks
    of self-attention, cross-attention and MLP (torch's decoder layer). Used in training only."""

    def __init__(self, width: int, heads: int, hidden: int, depth: int):
        super().__init__()
        self.blocks = _pre_ln_blocks(nn.TransformerDecoderLayer, depth, width, heads, hidden)

    def forward(self, x: Tensor, context: Tensor, x_real: Optional[Tensor] = None,
                context_real: Optional[Tensor] = None) -> Tensor:
        """x [B, N, d] attends to context [B, M, d]; `*_real` [B, ·] bool, False at padding."""
        x_padding = None if x_real is None else ~x_real
        context_padding = None if context_real is None else ~context_real
        for block in self.blocks:
            x = block(x, context, tgt_key_padding_mask=x_padding, memory_key_padding_mask=context_padding)
        return x
