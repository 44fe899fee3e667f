"""Audio: p×p patches of a clip's log-mel spectrogram, each with a learned position (PolyViT, AST).

The model reads mono waveforms at `model.audio.sample_rate` (the data pipeline only decodes and
crops, `limoe.data.audio.decode_clip`); the spectrogram is computed here, on the model's device,
as part of the model: `LogMel` holds no learned numbers and saves nothing in checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from limoe.errors import LimoeError
from limoe.modalities import Modality
from limoe.modalities.log_mel import LogMel
from limoe.modalities.patches import PatchEmbedder, patchify
from limoe.modalities.tokens import Tokens

if TYPE_CHECKING:
    from limoe.config import ModelConfig


class AudioEmbedder(PatchEmbedder):
    """waveforms [B, T] → spectrogram patch tokens: log-mel [B, n_mels, frames], normalised with the
    config's fixed (x − mean) / std, a p×p stride-p convolution over [B, 1, n_mels, frames]
    (frequency × time; frames past the last whole patch are cropped), plus one learned position
    per patch, plus a leading class token with `cls` pooling.

    Tokens run time-major (all frequency patches of the first p frames, then the next p frames'),
    so a clip shorter than `model.audio.clip_seconds` takes the first of the positions, as a short
    caption takes the first text positions. The positions and the class token are drawn here
    (`tower_parameters`) and held by the tower (see `Limoe.embed`)."""

    def __init__(self, config: ModelConfig):
        audio = config.audio
        super().__init__(config, MODALITY.name, 1, audio.patch_size, audio.num_patches, audio.pool)
        self.log_mel = LogMel(audio.sample_rate, audio.n_mels, audio.window_ms, audio.hop_ms)
        self.mean, self.std = audio.mean, audio.std

    def features(self, waveforms: Tensor) -> Tensor:
        """waveforms [B, T] → the normalised log-mel [B, 1, n_mels, frames'] the patches are cut from,
        frames' = p · (frames // p): the trailing frames short of a whole patch cropped."""
        p = self.patch_size
        features = (self.log_mel(waveforms) - self.mean) / self.std  # [B, n_mels, frames]
        steps = features.shape[-1] // p  # whole patches along time
        if not 0 < steps * (features.shape[-2] // p) <= self.num_patches:
            raise LimoeError(f"a clip of {waveforms.shape[-1]} samples gives {steps} patches along time; this model "
                             f"reads clips of one patch up to model.audio.clip_seconds (its positions cover "
                             f"{self.num_patches} patches); crop the clips to that length.")
        return features[:, None, :, : steps * p]

    def forward(self, waveforms: Tensor, positions: Tensor, cls_token: Optional[Tensor],
                keep: Optional[Tensor] = None) -> Tokens:
        """waveforms [B, T] → patch tokens [B, Np(+1), d], Np = (n_mels / p) · (frames // p).

        `keep` [B, K] (patch indices, time-major) as for images: only those patches enter the tower.
        """
        grid = self.patch_embed(self.features(waveforms).to(self.patch_embed.weight.dtype))  # [B, d, F', T']
        return self.patch_tokens(grid.permute(0, 3, 2, 1).flatten(1, 2), positions, cls_token, keep)  # time-major

    def patch_values(self, waveforms: Tensor) -> Tensor:
        """waveforms [B, T] → each patch's normalised log-mel values [B, Np, p·p], in token order (time-major:
        the spectrogram is patched as time × frequency, so the patches of the first p frames come first)."""
        return patchify(self.features(waveforms).transpose(-1, -2), self.patch_size)  # [B, 1, frames', n_mels]


def dummy_batch(config: ModelConfig, batch: int) -> Tensor:
    """[B, T] float32 silent clips of model.audio.clip_seconds, as the data pipeline delivers them."""
    return torch.zeros(batch, config.audio.clip_samples)


MODALITY = Modality(
    name="audio",
    short_name="aud",
    color="#1b7837",  # green, apart from the image-text heatmap's RdBu
    embedder=AudioEmbedder,
    pool=lambda config: config.audio.pool,
    dummy_batch=dummy_batch,
)
