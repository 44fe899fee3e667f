"""Video clips (`KEY.mp4`, `KEY.webm`, or a filmstrip `KEY.png` / `KEY.jpg`, with captions as
audio's), decoded in the worker to `frames` frames `frame_stride` source frames apart
(`limoe.data.video`: a random window and one random crop box for all frames in training, the
centre window and the eval crop in evaluation) and batched as uint8 [B, T, 3, S, S], normalised
where images are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Optional

import numpy as np
import torch
from PIL import Image

from limoe.data.crops import crop_clip
from limoe.data.preprocess import normalize
from limoe.data.readers import Reader
from limoe.data.video import VIDEO_EXTENSIONS, VIDEO_FILE_EXTENSIONS, UnusableVideo, decode_frames, require_pyav
from limoe.errors import LimoeError

if TYPE_CHECKING:
    from limoe.config import ModelConfig


@dataclass(frozen=True)
class VideoReader(Reader):
    """Clips of `frames` frames `frame_stride` source frames apart, each frame cropped to `image_size`
    (in the worker, whatever resize_on)."""

    image_size: int
    frames: int
    frame_stride: int

    name = "video"
    extensions = VIDEO_EXTENSIONS
    listed_captions = True
    unusable = UnusableVideo
    inputs = "clips"

    @classmethod
    def from_options(cls, image_size: int, resize_on: Literal["worker", "device"],
                     decode_on: Literal["worker", "device"], frames: Optional[int] = None,
                     frame_stride: Optional[int] = None) -> VideoReader:
        """Clips of a positive whole number of frames and stride."""
        if not all(isinstance(n, int) and n > 0 for n in (frames, frame_stride)):
            raise LimoeError(f"video shards need a positive whole number of frames and frame stride (got frames "
                             f"{frames}, frame_stride {frame_stride}); set model.video.frames and "
                             f"model.video.frame_stride.")
        return cls(image_size, frames, frame_stride)

    @classmethod
    def loader_options(cls, config: ModelConfig) -> dict:
        return {"frames": config.video.frames, "frame_stride": config.video.frame_stride}

    @classmethod
    def input_bytes(cls, config: ModelConfig, resize_on: Literal["worker", "device"]) -> int:
        """uint8 [T, 3, S, S], always cropped in the worker."""
        return config.video.frames * 3 * config.image_size**2

    def check_decoder(self, first_sample: Callable[[], Optional[dict]]) -> None:
        """PyAV, when the shards hold video files (filmstrips need only Pillow)."""
        sample = first_sample()
        if sample and any(extension in sample for extension in VIDEO_FILE_EXTENSIONS):
            require_pyav()

    def decode(self, data: bytes, train: bool, draws: Optional[random.Random]) -> list[Image.Image]:
        """The clip's `frames` RGB frames: a window drawn with `draws` (training), else the centre one."""
        return decode_frames(data, self.frames, self.frame_stride, "random" if draws is not None else "centre", draws)

    def prepare(self, decoded: list[Image.Image], train: bool) -> np.ndarray:
        """The frames cropped by one box to [T, 3, S, S] uint8 (`limoe.data.crops.crop_clip`)."""
        return crop_clip(decoded, self.image_size, train)

    def collate(self, inputs: list[np.ndarray], train: bool) -> torch.Tensor:
        clips = torch.from_numpy(np.stack(inputs))  # [B, T, 3, S, S] uint8
        return clips if train else normalize(clips)


READER = VideoReader
