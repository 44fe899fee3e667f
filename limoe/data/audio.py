"""Decoding untrusted audio bytes into the fixed-length mono clips the model reads.

A shard's audio may be FLAC, WAV, Ogg Vorbis, Opus or MP3, at any sample rate, mono or not, and of
any length (LAION-CLAP's shards hold clips of a few seconds to minutes). `soundfile` (libsndfile,
bundled in its wheel) reads the header first; only the frames of the crop are then decoded —
random in training, the centre in evaluation — so a ten-minute file costs what its crop costs.
The crop is mixed to mono, resampled to the model's rate and zero-padded to its length. A file
that does not decode, holds no audio or decodes to non-finite samples is skipped and counted
like a corrupt image (`UnusableAudio`'s reason is the count's name).
"""

from __future__ import annotations

import io
import math
import random
from typing import Literal, Optional

import numpy as np
import soundfile

AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "opus", "mp3")  # the shard member names limoe reads as audio
ZERO_CROSSINGS = 16  # of the resampling filter's sinc on each side: ~0.1% error in the passband


class UnusableAudio(Exception):
    """A clip that is skipped; `args[0]` is the reason counted: bad_audio, empty_audio or nonfinite_audio."""


def decode_clip(data: bytes, rate: int, seconds: float, crop: Literal["random", "centre"],
                rng: Optional[random.Random] = None) -> np.ndarray:
    """The `seconds`-long mono clip at `rate` [round(rate·seconds)] float32 taken from the encoded
    audio `data`: a random window (`rng`) or the centre one; shorter audio is zero-padded at the end."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as source:
            frames, source_rate = source.frames, source.samplerate
            if frames <= 0 or source_rate <= 0:
                raise UnusableAudio("empty_audio")
            window = min(frames, math.ceil(seconds * source_rate))
            start = (rng or random).randint(0, frames - window) if crop == "random" else (frames - window) // 2
            source.seek(start)
            samples = source.read(window, dtype="float32", always_2d=True)  # [window, channels]
    except UnusableAudio:
        raise
    except Exception:  # libsndfile reports malformed input through several error types
        raise UnusableAudio("bad_audio") from None
    if samples.size == 0:
        raise UnusableAudio("empty_audio")
    mono = samples.mean(axis=1)  # [window]
    if not np.isfinite(mono).all():
        raise UnusableAudio("nonfinite_audio")
    clip = resample(mono, source_rate, rate)
    length = round(rate * seconds)
    return np.pad(clip[:length], (0, max(0, length - clip.shape[0]))).astype(np.float32)


def resample(waveform: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """`waveform` [T] at `source_rate` → [ceil(T·target/source)] at `target_rate`, band-limited to
    99% of the lower Nyquist frequency by a Hann-windowed sinc (polyphase: one filter per output phase).

    Output sample n lies at time n/target; with target/source reduced to up/down, n = k·up + i sits
    at input position k·down + i·down/up, so phase i applies the same taps to every k.
    """
    if source_rate == target_rate:
        return waveform
    divisor = math.gcd(source_rate, target_rate)
    up, down = target_rate // divisor, source_rate // divisor
    cutoff = 0.99 * min(source_rate, target_rate) / 2  # Hz
    half_width = ZERO_CROSSINGS / (2 * cutoff)  # seconds on each side of the output sample
    reach = math.ceil(half_width * source_rate)  # input samples on each side
    offsets = np.arange(-reach, reach + down)  # [S] input positions relative to k·down (phases reach ~down ahead)
    delay = np.arange(up)[:, None] / target_rate - offsets[None, :] / source_rate  # [up, S] seconds
    window = np.where(np.abs(delay) <= half_width, 0.5 + 0.5 * np.cos(np.pi * delay / half_width), 0.0)
    taps = (2 * cutoff / source_rate) * np.sinc(2 * cutoff * delay) * window  # [up, S]
    outputs = math.ceil(waveform.shape[0] * up / down)
    blocks = math.ceil(outputs / up)  # k = 0 … blocks−1
    padded = np.pad(waveform.astype(np.float64), (reach, reach + blocks * down))
    windows = np.lib.stride_tricks.sliding_window_view(padded, offsets.shape[0])[: blocks * down : down]  # [blocks, S]
    return (windows @ taps.T).reshape(-1)[:outputs].astype(np.float32)  # [blocks·up] → [outputs]
