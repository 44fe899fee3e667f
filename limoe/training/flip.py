"""FLIP's patch dropping in contrastive training (Li et al. 2023): each image enters the tower with a
random share of its patches left out, which cuts the image side's cost roughly in proportion; a
short unmasked phase at the end lets the model adapt to whole images, which evaluation always sees.
Audio clips drop spectrogram patches the same way (`train.audio_mask_ratio`, its own share, drawn
apart from the images'), with the same unmasked phase.

Video clips (`train.video_mask_ratio`) drop *tubes*: a share of the frame grid's positions, the same
ones in every tubelet step of a clip (VideoMAE's tube masking), rather than tubelets drawn
independently. A kept position then shows its whole time course, so what moves across it stays
visible from the first step to the last; independent tubelets would leave each position a few
scattered steps, and the tubelet steps a clip keeps would differ in where they look, which is what
tells the directions of motion apart in the first place. The kept count is round(Np·(1 − r)) of the
Np = (S/p)² positions, times the T/t steps.

The kept patches are chosen before the tower (`limoe.modalities.image.ImageEmbedder`,
`limoe.modalities.audio.AudioEmbedder`), so attention, routing groups, expert capacity and Batch
Priority Routing all work on the kept tokens alone. Masks are a pure
function of (seed, step) over the global batch (`limoe.model.masking`), so a resumed run draws
the masks an uninterrupted run would have, whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from limoe.config import Config
from limoe.model.masking import tube_keep_at

MODALITIES = ("image", "audio", "video")  # the modalities made of patches, which FLIP may drop


@dataclass(frozen=True)
class PatchDropping:
    """One modality's share of patches dropped (`train.image_mask_ratio`, `train.audio_mask_ratio`,
    `train.video_mask_ratio`) until the last `train.unmasked_steps` steps."""

    ratio: float
    masked_steps: int  # steps 0 … masked_steps − 1 drop patches
    num_patches: Callable[[Tensor], int]  # N of a batch of this modality's inputs (video: of one tubelet step)
    seed: int
    purpose: str  # keeps the modalities' draws apart
    tube_steps: Callable[[Tensor], int] = lambda inputs: 1  # video: tubelet steps of a batch of clips, masked alike

    @classmethod
    def from_config(cls, config: Config, modality: str = "image") -> "PatchDropping":
        train, model = config.train, config.model
        masked_steps = train.steps - train.unmasked_steps
        if modality == "image":
            return cls(train.image_mask_ratio, masked_steps, lambda images: model.num_patches, train.seed, "flip")
        if modality == "audio":  # [B, T] waveforms: a clip may be shorter than model.audio.clip_seconds
            return cls(train.audio_mask_ratio, masked_steps, lambda clips: model.audio.patches_of(clips.shape[-1]),
                       train.seed, "flip_audio")
        if modality == "video":  # [B, T, 3, S, S] clips: T/t tubelet steps of the frame grid's positions
            return cls(train.video_mask_ratio, masked_steps, lambda clips: model.num_patches, train.seed, "flip_video",
                       lambda clips: clips.shape[1] // model.video.tubelet_frames)
        raise ValueError(f"no patches to drop in modality {modality!r}")

    def masks(self, step: int) -> bool:
        return self.ratio > 0 and step < self.masked_steps

    def stage(self, step: int) -> Optional[str]:
        """The phases route different numbers of image tokens, so their routing statistics are kept apart."""
        if self.ratio == 0:
            return None
        return "masked" if self.masks(step) else "unmasked"

    def keep(self, inputs: Tensor, step: int) -> Optional[Tensor]:
        """The patches each input (image [B, 3, H, W], audio clip [B, T]) keeps at `step` [B, K], or
        None: keep them all; a video clip [B, T, 3, S, S] keeps tubes [B, T/t · K], time-major."""
        if not self.masks(step):
            return None
        return tube_keep_at(step, self.seed, self.purpose, inputs, self.num_patches(inputs), self.tube_steps(inputs),
                            self.ratio)
