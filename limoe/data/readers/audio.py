"""Audio clips (LAION-CLAP's shards: `KEY.flac` and a `KEY.json` whose `"text"` lists captions),
decoded in the worker at the model's rate and length (`limoe.data.audio.decode_clip`: a random
window in training, the centre one in evaluation) and batched as float32 waveforms; the model
computes the features on the device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

import numpy as np
import torch

from limoe.data.audio import AUDIO_EXTENSIONS, UnusableAudio, decode_clip
from limoe.data.readers import Reader
from limoe.errors import LimoeError

if TYPE_CHECKING:
    from limoe.config import ModelConfig


@dataclass(frozen=True)
class AudioReader(Reader):
    """Mono clips of `clip_seconds` at `sample_rate` Hz: [T] float32, T = round(sample_rate · clip_seconds)."""

    sample_rate: int
    clip_seconds: float

    name = "audio"
    extensions = AUDIO_EXTENSIONS
    listed_captions = True
    unusable = UnusableAudio
    inputs = "clips"

    @classmethod
    def from_options(cls, image_size: int, resize_on: Literal["worker", "device"],
                     decode_on: Literal["worker", "device"], sample_rate: Optional[int] = None,
                     clip_seconds: Optional[float] = None) -> AudioReader:
        """Clips at a positive rate and length; the image settings do not apply."""
        if not (sample_rate and sample_rate > 0 and clip_seconds and clip_seconds > 0):
            raise LimoeError(f"audio shards need a positive sample rate and clip length (got {sample_rate} Hz, "
                             f"{clip_seconds} s); set model.audio.sample_rate and model.audio.clip_seconds.")
        return cls(sample_rate, clip_seconds)

    @classmethod
    def loader_options(cls, config: ModelConfig) -> dict:
        return {"sample_rate": config.audio.sample_rate, "clip_seconds": config.audio.clip_seconds}

    @classmethod
    def input_bytes(cls, config: ModelConfig, resize_on: Literal["worker", "device"]) -> int:
        """float32 [T] of the model's length."""
        return 4 * config.audio.clip_samples

    def decode(self, data: bytes, train: bool, draws: Optional[random.Random]) -> np.ndarray:
        """The [T] float32 clip: a window drawn with `draws` (training), else the centre one."""
        return decode_clip(data, self.sample_rate, self.clip_seconds, "random" if draws is not None else "centre",
                           draws)

    def prepare(self, decoded: np.ndarray, train: bool) -> np.ndarray:
        """The clip as it is: it was cropped when decoded."""
        return decoded

    def collate(self, inputs: list[np.ndarray], train: bool) -> torch.Tensor:
        return torch.from_numpy(np.stack(inputs))  # [B, T] float32 waveforms


READER = AudioReader
