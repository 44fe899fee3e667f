"""Images: patches of the picture, each with a learned position on the patch grid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from limoe.modalities import Modality
from limoe.modalities.tokens import Tokens, patch_tokens

if TYPE_CHECKING:
    from limoe.config import ModelConfig


class ImageEmbedder(nn.Module):
    """images [B, 3, H, W] → patch tokens: a p×p stride-p convolution, plus one learned position per
    patch (row-major over the (H/p)×(W/p) grid), plus a leading class token with `cls` pooling.

    The positions and the class token are drawn here (`tower_parameters`) and held by the tower
    (see `Limoe.embed`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, config.width, config.patch_size, config.patch_size)
        self.modality_id = config.modality_id(MODALITY.name)  # the tag its tokens carry in this model

    def tower_parameters(self, config: ModelConfig) -> dict[str, Optional[nn.Parameter]]:
        """The learned positions [Np, d] and, with `cls` pooling, the class token [1, 1, d]."""
        width = config.width
        return {"positions": nn.Parameter(torch.randn(config.num_patches, width) * 0.02),
                "cls_token": nn.Parameter(torch.zeros(1, 1, width)) if config.image_pool == "cls" else None}

    def init_weights(self) -> None:
        """Nothing to draw after the tower's linear layers: the convolution keeps PyTorch's init and
        the positions were drawn with `tower_parameters`."""

    def unused_per_token(self) -> int:
        """Parameters of this embedder a patch token is not computed with: none."""
        return 0

    def forward(self, images: Tensor, positions: Tensor, cls_token: Optional[Tensor],
                keep: Optional[Tensor] = None) -> Tokens:
        """images [B, 3, H, W] → patch tokens [B, Np(+1), d] with learned 2-D positions [Np, d].

        With `keep` [B, K] (patch indices) only those patches enter the tower: MAE's visible
        patches, FLIP's kept share (see `patch_tokens`).
        """
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, Np, d]
        return patch_tokens(x, positions, cls_token, keep, self.modality_id, MODALITY.name)


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
