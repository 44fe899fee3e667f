"""`model.audio`: how a model with the audio modality turns a waveform into tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from limoe.config.keys import setting
from limoe.errors import LimoeError
from limoe.modalities.stft_sizes import frame_count, stft_sizes


@dataclass(frozen=True)
class AudioConfig:
    """Audio: fixed-length mono clips → log-mel spectrogram (`limoe.modalities.log_mel`) → p×p patches.

    The spectrogram of a clip has n_mels rows and 1 + (T − n_fft) // hop frames; it is cut into
    p×p patches (frequency × time). Frames past the last whole patch are cropped (at most p − 1
    frames, < p × hop_ms at the end of the clip): 1 s at 16 kHz gives 97 frames, 6 patches of 16
    along time; 8 s (PolyViT's) give 797 frames, 49 patches
    along time (PolyViT pads to 800 frames, 50)."""

    sample_rate: int = setting(16000, "samples per second of the waveforms the model reads (clips are resampled "
                                      "to it when decoded)", "[1000, 1000000]")
    clip_seconds: float = setting(8.0, "length of the clips the model reads (PolyViT: 8 s); learned positions "
                                       "exist for this length, a shorter clip uses the first ones", "(0, 3600]")
    n_mels: int = setting(128, "mel filters (spectrogram rows); must be a multiple of patch_size", "[1, 4096]")
    window_ms: float = setting(25.0, "STFT window length in milliseconds (Hann)", "(0, 1000]")
    hop_ms: float = setting(10.0, "STFT hop in milliseconds: one spectrogram frame per hop", "(0, 1000]")
    patch_size: int = setting(16, "side p of the square patches of the spectrogram (frequency × time); trailing "
                                  "frames short of a whole patch are cropped", "[1, 4096]")
    pool: Literal["map", "cls", "mean"] = setting("map", "audio pooling: map = attention pooling with a learned "
                                                         "probe, cls token, or mean")
    mean: float = setting(-3.40, "fixed normalisation (x − mean) / std of the log-mel; the default is the mean of "
                                 "every log-mel value of the 288 clips of data_shards/audio_train (1 s, centre "
                                 "crop, these STFT settings), measured 2026-12-06 by tests/modalities/test_audio.py"
                                 "::test_normalisation_defaults_are_the_demo_clips_statistics (AST and ImageBind "
                                 "normalise their Kaldi fbank of AudioSet with −4.27 and 9.14)", "(-inf, inf)")
    std: float = setting(3.97, "the std of the same values (see mean)", "(0, inf)")

    def __post_init__(self):
        if self.n_mels % self.patch_size:
            raise LimoeError(f"model.audio.n_mels {self.n_mels} is not a multiple of model.audio.patch_size "
                             f"{self.patch_size}; pick sizes that divide evenly (e.g. 128 mel bins, patches of 16).")
        _, _, n_fft = stft_sizes(self.sample_rate, self.window_ms, self.hop_ms)
        if self.clip_samples < n_fft:
            raise LimoeError(f"model.audio.clip_seconds {self.clip_seconds} holds {self.clip_samples} samples, fewer "
                             f"than one {n_fft}-point STFT frame; use longer clips.")
        if self.frames < self.patch_size:
            raise LimoeError(f"model.audio.clip_seconds {self.clip_seconds} gives {self.frames} spectrogram frames, "
                             f"fewer than one patch of {self.patch_size}; use longer clips or a smaller patch_size.")

    @property
    def clip_samples(self) -> int:
        """T: samples in one clip."""
        return round(self.sample_rate * self.clip_seconds)

    def frames_of(self, samples: int) -> int:
        """Spectrogram frames of a clip of `samples` samples."""
        _, hop, n_fft = stft_sizes(self.sample_rate, self.window_ms, self.hop_ms)
        return frame_count(samples, hop, n_fft)

    @property
    def frames(self) -> int:
        """Spectrogram frames of one clip."""
        return self.frames_of(self.clip_samples)

    @property
    def num_patches(self) -> int:
        """Audio tokens of one clip: (n_mels / p) · (frames // p)."""
        return self.patches_of(self.clip_samples)

    def patches_of(self, samples: int) -> int:
        """Audio tokens of a clip of `samples` samples (one no longer than a whole clip)."""
        return (self.n_mels // self.patch_size) * (self.frames_of(samples) // self.patch_size)
