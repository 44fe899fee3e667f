"""FLIP's patch dropping in contrastive training (Li et al. 2023): each image enters the tower with a
random share of its patches left out, which cuts the image side's cost roughly in proportion; a
short unmasked phase at the end lets the model adapt to whole images, which evaluation always sees.

The kept patches are chosen before the tower (`limoe.modalities.image.ImageEmbedder`), so attention, routing groups,
expert capacity and Batch Priority Routing all work on the kept tokens alone. Masks are a pure
function of (seed, step) over the global batch (`limoe.model.masking`), so a resumed run draws
the masks an uninterrupted run would have, whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from limoe.config import Config
from limoe.model.masking import patch_keep_at


@dataclass(frozen=True)
class PatchDropping:
    """`train.image_mask_ratio` of the patches dropped until the last `train.unmasked_steps` steps."""

    ratio: float
    masked_steps: int  # steps 0 … masked_steps − 1 drop patches
    num_patches: int
    seed: int

    @classmethod
    def from_config(cls, config: Config) -> "PatchDropping":
        train = config.train
        return cls(train.image_mask_ratio, train.steps - train.unmasked_steps, config.model.num_patches, train.seed)

    def masks(self, step: int) -> bool:
        return self.ratio > 0 and step < self.masked_steps

    def stage(self, step: int) -> Optional[str]:
        """The phases route different numbers of image tokens, so their routing statistics are kept apart."""
        if self.ratio == 0:
            return None
        return "masked" if self.masks(step) else "unmasked"

    def keep(self, images: Tensor, step: int) -> Optional[Tensor]:
        """The patches each image [B, 3, H, W] keeps at `step` [B, K], or None: keep them all."""
        if not self.masks(step):
            return None
        return patch_keep_at(step, self.seed, "flip", images, self.num_patches, self.ratio)
