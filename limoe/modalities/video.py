"""Video: t×p×p tubelets of a clip of frames, each with a learned spatio-temporal position (ViViT's
tubelet embedding, PolyViT's video).

The model reads clips [B, T, 3, S, S] of T ≤ `model.video.frames` frames at the image resolution
S = model.image_size, each frame normalised exactly as an image is (the training step normalises
the loader's uint8 clips on the device, `limoe.factory.preprocess_video` applies the images' eval
transform to each frame). Tubelets share the image patch side p = model.patch_size, so that an
image model's patch kernel and positions can seed them (`train.init_video_from_image`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from limoe.errors import LimoeError
from limoe.modalities import Modality
from limoe.modalities.patches import PatchEmbedder, patchify
from limoe.modalities.tokens import Tokens

if TYPE_CHECKING:
    from limoe.config import ModelConfig


class VideoEmbedder(PatchEmbedder):
    """clips [B, T, 3, S, S] → tubelet tokens: a t×p×p stride-(t, p, p) 3-D convolution, plus a
    learned position per tubelet, plus a leading class token with `cls` pooling.

    Tokens run time-major: all (S/p)² tubelets of the first t frames (row-major, as an image's
    patches), then the next t frames'. So a clip with fewer frames than model.video.frames takes
    the first positions. Positions are either one joint table [T/t · (S/p)², d] or, `separable`,
    a spatial table [(S/p)², d] (`positions`) plus a temporal one [T/t, d] (`temporal_positions`),
    added. They and the class token are drawn here (`tower_parameters`) and held by the tower."""

    def __init__(self, config: ModelConfig):
        video = config.video
        separable = video.positions == "separable"
        table = config.num_patches if separable else config.video_tokens
        super().__init__(config, MODALITY.name, 3, config.patch_size, table, video.pool, video.tubelet_frames)
        self.separable, self.image_size = separable, config.image_size
        self.tubelet_frames, self.steps = video.tubelet_frames, video.steps
        self.input_tokens = config.video_tokens  # the separable table holds one step's grid only

    def tower_parameters(self, config: ModelConfig) -> dict[str, Optional[nn.Parameter]]:
        """The positions (joint [T/t · Np, d], or spatial [Np, d]), with `separable` positions the
        temporal table [T/t, d], and with `cls` pooling the class token [1, 1, d]."""
        held = super().tower_parameters(config)
        if not self.separable:
            return held
        temporal = nn.Parameter(torch.randn(self.steps, config.width) * 0.02)
        return {"positions": held["positions"], "temporal_positions": temporal, "cls_token": held["cls_token"]}

    def forward(self, clips: Tensor, positions: Tensor, cls_token: Optional[Tensor],
                temporal_positions: Optional[Tensor] = None, keep: Optional[Tensor] = None) -> Tokens:
        """clips [B, T, 3, S, S] normalised → tubelet tokens [B, Nv(+1), d], Nv = T/t · (S/p)².

        `keep` [B, K] (tubelet indices, time-major) as for images: only those tubelets enter the tower.
        """
        frames, size = clips.shape[1], clips.shape[-1]
        steps = frames // self.tubelet_frames
        if frames % self.tubelet_frames or not 0 < steps <= self.steps or clips.shape[-2:] != (self.image_size,) * 2:
            raise LimoeError(f"a clip of {frames} frames of {clips.shape[-2]}×{size} pixels does not fit this model; "
                             f"it reads up to model.video.frames {self.steps * self.tubelet_frames} frames, a "
                             f"multiple of model.video.tubelet_frames {self.tubelet_frames}, of model.image_size "
                             f"{self.image_size}×{self.image_size} pixels; sample and crop the clips so.")
        grid = self.patch_embed(clips.transpose(1, 2))  # [B, 3, T, S, S] → [B, d, T/t, S/p, S/p]
        tubelets = grid.flatten(2).transpose(1, 2)  # [B, Nv, d], time-major
        if temporal_positions is not None:  # separable: each step's spatial grid plus its temporal position
            positions = (temporal_positions[:steps, None] + positions[None]).flatten(0, 1)  # [Nv, d]
        return self.patch_tokens(tubelets, positions, cls_token, keep)

    def patch_values(self, clips: Tensor) -> Tensor:
        """clips [B, T, 3, S, S] normalised → each tubelet's values [B, Nv, t·p·p·3], in token order
        (time-major: all tubelets of the first t frames, row-major, then the next t frames'); within a
        tubelet frame by frame, each frame's p×p patch as `patchify` orders an image patch's pixels."""
        batch, frames = clips.shape[:2]
        steps, t = frames // self.tubelet_frames, self.tubelet_frames
        per_frame = patchify(clips.flatten(0, 1), self.patch_size)  # [B·T, Np, p·p·3]
        per_frame = per_frame.view(batch, steps, t, *per_frame.shape[1:])  # [B, T/t, t, Np, p·p·3]
        return per_frame.transpose(2, 3).reshape(batch, steps * per_frame.shape[3], -1)  # [B, Nv, t·p·p·3]


def dummy_batch(config: ModelConfig, batch: int) -> Tensor:
    """[B, T, 3, S, S] uint8 clips of model.video.frames frames, as the data pipeline delivers them
    (values are never read)."""
    size = config.image_size
    return torch.empty(batch, config.video.frames, 3, size, size, dtype=torch.uint8)


MODALITY = Modality(
    name="video",
    short_name="vid",
    color="#e08214",  # orange, apart from the image-text heatmap's RdBu and audio's green
    embedder=VideoEmbedder,
    pool=lambda config: config.video.pool,
    dummy_batch=dummy_batch,
)
