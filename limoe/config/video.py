"""`model.video`: how a model with the video modality turns a clip of frames into tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from limoe.config.keys import setting
from limoe.errors import LimoeError


@dataclass(frozen=True)
class VideoConfig:
    """Video (ViViT's tubelet embedding): a clip of `frames` frames, each model.image_size square and
    normalised as images are, cut into t×p×p tubelets (t = tubelet_frames, p = model.patch_size),
    one token each: (frames / t) · (image_size / p)² tokens, time-major."""

    frames: int = setting(8, "frames per clip the model reads; learned positions exist for this many, a clip with "
                             "fewer (a multiple of tubelet_frames) uses the first ones", "[1, 4096]")
    frame_stride: int = setting(2, "source frames between two sampled ones (the data pipeline's sampling; 1: "
                                   "consecutive frames)", "[1, 4096]")
    tubelet_frames: int = setting(2, "t of the t×p×p tubelets (ViViT); frames must be a multiple of it", "[1, 4096]")
    positions: Literal["joint", "separable"] = setting(
        "joint", "joint: one learned position per tubelet (time × space); separable: a spatial table (one per "
                 "patch of the frame grid) plus a temporal table (one per tubelet step), added")
    pool: Literal["map", "cls", "mean"] = setting("map", "video pooling: map = attention pooling with a learned "
                                                         "probe, cls token, or mean")

    def __post_init__(self):
        if self.frames % self.tubelet_frames:
            raise LimoeError(f"model.video.frames {self.frames} is not a multiple of model.video.tubelet_frames "
                             f"{self.tubelet_frames}; pick sizes that divide evenly (e.g. 8 frames, tubelets of 2).")

    @property
    def steps(self) -> int:
        """Tubelets along time in one clip: frames / t."""
        return self.frames // self.tubelet_frames
