"""Images: patches of the picture, each with a learned position on the patch grid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from limoe.modalities import Modality
from limoe.modalities.patches import PatchEmbedder, patchify
from limoe.modalities.tokens import Tokens

if TYPE_CHECKING:
    from limoe.config import ModelConfig


class ImageEmbedder(PatchEmbedder):
    """images [B, 3, H, W] → patch tokens: a p×p stride-p convolution, plus one learned position per
    patch (row-major over the (H/p)×(W/p) grid), plus a leading class token with `cls` pooling.

    The positions and the class token are drawn here (`tower_parameters`) and held by the tower
    (see `Limoe.embed`)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, MODALITY.name, 3, config.patch_size, config.num_patches, config.image_pool)

    def forward(self, images: Tensor, positions: Tensor, cls_token: Optional[Tensor],
                keep: Optional[Tensor] = None) -> Tokens:
        """images [B, 3, H, W] → patch tokens [B, Np(+1), d] with learned 2-D positions [Np, d].

        With `keep` [B, K] (patch indices) only those patches enter the tower: MAE's visible
        patches, FLIP's kept share (see `patch_tokens`).
        """
        return self.patch_tokens(self.patch_embed(images).flatten(2).transpose(1, 2), positions, cls_token, keep)

    def patch_values(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] (as `forward` takes them) → each patch's pixels [B, Np, p·p·3], in token order."""
        return patchify(images, self.patch_size)


def dummy_batch(config: ModelConfig, batch: int) -> Tensor:
    """[B, 3, H, W] uint8 images, as the data pipeline delivers them (values are never read)."""
    return torch.empty(batch, 3, config.image_size, config.image_size, dtype=torch.uint8)


MODALITY = Modality(
    name="image",
    short_name="img",
    color="#2166ac",  # blue, the image end of the routing heatmap's RdBu
    embedder=ImageEmbedder,
    pool=lambda config: config.image_pool,
    dummy_batch=dummy_batch,
)
