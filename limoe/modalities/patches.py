"""What image, audio and video embedders share: patches of a grid (pixels, a spectrogram's
frequency × time, or a clip's time × pixels) become tokens with learned positions and an optional
class token, and each token's patch values in the same order (masked pretraining's reconstruction
targets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from limoe.modalities.tokens import Tokens

if TYPE_CHECKING:
    from limoe.config import ModelConfig


def patchify(grid: Tensor, patch: int) -> Tensor:
    """grid [B, C, H, W] → its p×p patches [B, N, p·p·C], row-major over the (H/p)×(W/p) patches."""
    batch, channels, height, width = grid.shape
    x = grid.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // patch) * (width // patch), patch * patch * channels)


class PatchEmbedder(nn.Module):
    """A convolution from `channels` to the tower's width whose stride is its kernel (p×p for a
    2-D grid, t×p×p tubelets for a clip), one learned position per patch and, with `cls` pooling,
    a class token. Subclasses turn their raw batch into the patch embeddings and hand them to
    `patch_tokens`, and give the values each patch token is computed from (`patch_values`), which
    MAE-style pretraining reconstructs."""

    def __init__(self, config: ModelConfig, name: str, channels: int, patch_size: int, num_patches: int, pool: str,
                 tubelet_frames: Optional[int] = None):
        super().__init__()
        if tubelet_frames is None:
            self.patch_embed = nn.Conv2d(channels, config.width, patch_size, patch_size)
        else:
            kernel = (tubelet_frames, patch_size, patch_size)
            self.patch_embed = nn.Conv3d(channels, config.width, kernel, kernel)
        self.name, self.num_patches, self.with_cls_token = name, num_patches, pool == "cls"
        self.input_tokens = num_patches  # patch tokens of one whole input (a subclass's table may be smaller)
        self.steps = 1  # repetitions of one grid its tokens make (video: tubelet steps), masked alike
        self.patch_size = patch_size
        self.patch_dim = channels * (tubelet_frames or 1) * patch_size**2  # P: the values of one patch (or tubelet)
        self.modality_id = config.modality_id(name)  # the tag its tokens carry in this model

    def tower_parameters(self, config: ModelConfig) -> dict[str, Optional[nn.Parameter]]:
        """The learned positions [Np, d] and, with `cls` pooling, the class token [1, 1, d]."""
        width = config.width
        return {"positions": nn.Parameter(torch.randn(self.num_patches, width) * 0.02),
                "cls_token": nn.Parameter(torch.zeros(1, 1, width)) if self.with_cls_token else None}

    def init_weights(self) -> None:
        """Nothing to draw after the tower's linear layers: the convolution keeps PyTorch's init and
        the positions were drawn with `tower_parameters`."""

    def unused_per_token(self) -> int:
        """Parameters of this embedder a patch token is not computed with: none."""
        return 0

    def patch_tokens(self, x: Tensor, positions: Tensor, cls_token: Optional[Tensor], keep: Optional[Tensor]) -> Tokens:
        """Patch embeddings x [B, N, d] → their `Tokens`: plus learned positions [≥ N, d] (the first
        N), only the patches in `keep` [B, K] when given, and a leading class token [1, 1, d] when
        given. Every token is real and tagged with this modality's id.

        `keep` selects before any block, so attention, routing groups, expert capacity and Batch
        Priority Routing all work on the K kept tokens (MAE's visible patches, FLIP's kept share).
        """
        x = x + positions[: x.shape[1]]  # [B, N, d]
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, d]
        if cls_token is not None:
            x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        modality = torch.full(x.shape[:2], self.modality_id, device=x.device, dtype=torch.long)
        return Tokens(x, modality, None, self.name)
