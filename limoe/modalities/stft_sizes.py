"""The sizes of a short-time Fourier transform in samples, without torch: `model.audio`'s checks
(`limoe.config.audio`) and the log-mel features (`limoe.modalities.log_mel`) count frames alike."""

from __future__ import annotations

import math


def stft_sizes(sample_rate: int, window_ms: float, hop_ms: float) -> tuple[int, int, int]:
    """(window, hop, n_fft) in samples: the window and hop rounded to whole samples, the FFT the
    next power of two at or above the window (400, 160, 512 at 16 kHz, 25 ms, 10 ms)."""
    window = round(sample_rate * window_ms / 1000)
    return window, round(sample_rate * hop_ms / 1000), 2 ** math.ceil(math.log2(window))


def frame_count(samples: int, hop: int, n_fft: int) -> int:
    """Spectrogram frames of a clip of `samples` samples, frames not centred (no frame is padding)."""
    return 1 + (samples - n_fft) // hop
