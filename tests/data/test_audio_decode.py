"""Audio clips from untrusted bytes: the crop, the mono mix, the resampler (against sines, whose
resampled form is known exactly) and the reasons a clip is skipped."""

import io
import random

import numpy as np
import pytest
import soundfile

from limoe.data.audio import UnusableAudio, decode_clip, resample


def _sine(frequency: float, rate: int, seconds: float, phase: float = 0.0) -> np.ndarray:
    return np.sin(2 * np.pi * frequency * np.arange(round(rate * seconds)) / rate + phase)


def _encoded(waveform: np.ndarray, rate: int, format: str = "WAV", subtype: str = "FLOAT") -> bytes:
    out = io.BytesIO()
    soundfile.write(out, waveform, rate, format=format, subtype=subtype)
    return out.getvalue()


@pytest.mark.parametrize("source_rate, target_rate, frequency", [(48_000, 16_000, 440.0), (16_000, 44_100, 1234.5),
                                                                 (22_050, 16_000, 6000.0)])
def test_a_resampled_sine_is_the_sine_sampled_at_the_new_rate(source_rate, target_rate, frequency):
    resampled = resample(_sine(frequency, source_rate, 0.5), source_rate, target_rate)
    expected = _sine(frequency, target_rate, 0.5)
    assert resampled.shape == expected.shape
    inner = slice(target_rate // 50, -target_rate // 50)  # away from the edges, where the filter sees zeros
    np.testing.assert_allclose(resampled[inner], expected[inner], atol=5e-3)


def test_frequencies_above_the_new_nyquist_are_removed_not_folded():
    aliased = resample(_sine(12_000.0, 48_000, 0.5), 48_000, 16_000)  # would fold to 4 kHz
    assert np.sqrt(np.mean(aliased[320:-320] ** 2)) < 0.01


def test_the_centre_crop_is_fixed_and_a_random_crop_lies_inside_the_clip():
    ramp = np.linspace(-1, 1, 16_000 * 3, dtype=np.float32)  # 3 s, each sample tells where it came from
    data = _encoded(ramp, 16_000)
    centre = decode_clip(data, 16_000, 1.0, "centre")
    np.testing.assert_array_equal(centre, ramp[16_000:32_000])
    starts = set()
    for seed in range(20):
        clip = decode_clip(data, 16_000, 1.0, "random", random.Random(seed))
        start = int(np.argmin(np.abs(ramp - clip[0])))
        np.testing.assert_array_equal(clip, ramp[start:start + 16_000])
        starts.add(start)
    assert len(starts) > 10


def test_stereo_is_mixed_to_mono_resampled_and_short_audio_padded_with_silence():
    left, right = _sine(440.0, 32_000, 0.25), _sine(880.0, 32_000, 0.25)
    data = _encoded(np.stack([left, right], axis=1), 32_000)
    clip = decode_clip(data, 16_000, 1.0, "centre")
    assert clip.shape == (16_000,) and clip.dtype == np.float32
    np.testing.assert_allclose(clip[400:3600], resample((left + right) / 2, 32_000, 16_000)[400:3600], atol=1e-6)
    assert not clip[4000:].any()


@pytest.mark.parametrize("format, subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_compressed_formats_decode(format, subtype):
    sine = 0.5 * _sine(440.0, 16_000, 1.0)
    clip = decode_clip(_encoded(sine, 16_000, format, subtype), 16_000, 0.5, "centre")
    assert clip.shape == (8_000,) and 0.3 < np.abs(clip).max() < 0.7


@pytest.mark.parametrize("data, reason", [
    (b"not audio at all", "bad_audio"),
    (_encoded(np.zeros(0, dtype=np.float32), 16_000), "empty_audio"),
    (_encoded(np.array([0.0, np.nan, 0.5], dtype=np.float32), 16_000), "nonfinite_audio"),
])
def test_unusable_audio_names_its_reason(data, reason):
    with pytest.raises(UnusableAudio) as raised:
        decode_clip(data, 16_000, 1.0, "centre")
    assert raised.value.args[0] == reason
