"""Text: open_clip's BPE token ids, each with a learned position in the caption."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from limoe.modalities import PADDING, Modality
from limoe.modalities.tokens import Tokens

if TYPE_CHECKING:
    from limoe.config import ModelConfig

PAD_TOKEN = 0  # open_clip's tokenizer pads with 0


class TextEmbedder(nn.Module):
    """tokens [B, L] ids → a row of the token embedding table each, plus a learned position per
    place in the context; padding is masked in attention and never routed.

    The positions are drawn here (`tower_parameters`) and held by the tower (see `Limoe.embed`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.token_embed = nn.Embedding(config.vocab_size, config.width)
        self.modality_id = config.modality_id(MODALITY.name)  # the tag its tokens carry in this model

    def tower_parameters(self, config: ModelConfig) -> dict[str, Optional[nn.Parameter]]:
        """The learned positions [L, d]."""
        return {"positions": nn.Parameter(torch.randn(config.context_length, config.width) * 0.01)}

    def init_weights(self) -> None:
        """N(0, 0.02) token embeddings (ViT/CLIP practice), drawn after the tower's linear layers."""
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def unused_per_token(self) -> int:
        """Parameters of this embedder a text token is not computed with: it reads one row of the
        table, not the table."""
        return self.token_embed.weight.numel() - self.token_embed.weight.shape[1]

    def forward(self, tokens: Tensor, positions: Tensor, at_mask: Optional[Tensor] = None,
                mask_embedding: Optional[Tensor] = None) -> Tokens:
        """tokens [B, L] ids → [B, L, d], with learned 1-D positions [L, d].

        Masked language modelling shows `mask_embedding` [d] instead of the token's embedding
        where `at_mask` [B, L] is True (BERT's [MASK]); such tokens stay text and are routed.
        """
        real = tokens != PAD_TOKEN  # [B, L]
        x = self.token_embed(tokens)  # [B, L, d]
        if at_mask is not None:
            x = torch.where(at_mask[..., None], mask_embedding.to(x.dtype), x)
        x = x + positions[: tokens.shape[1]]
        modality = torch.where(real, self.modality_id, PADDING)
        return Tokens(x, modality, real, MODALITY.name, tokens)


def dummy_batch(config: ModelConfig, batch: int) -> Tensor:
    """[B, L] token ids, all real (not padding), so every token is routed."""
    return torch.ones(batch, config.context_length, dtype=torch.long)


MODALITY = Modality(
    name="text",
    short_name="txt",
    color="#b2182b",  # red, the text end of the routing heatmap's RdBu
    embedder=TextEmbedder,
    pool=lambda config: config.text_pool,
    dummy_batch=dummy_batch,
)
