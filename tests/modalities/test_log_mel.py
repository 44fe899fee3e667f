"""The log-mel features equal librosa's with the same settings (stored by tests/fixtures/log_mel/record.py,
since librosa is not a dependency), on real clips and on a sine; and hand-checkable facts of the filters."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from limoe.modalities.log_mel import LogMel, hz_to_mel, mel_filterbank, mel_to_hz

REFERENCE = load_file(Path(__file__).resolve().parents[1] / "fixtures" / "log_mel" / "reference.safetensors")


@pytest.mark.parametrize("name", ["clip0", "clip1", "sine_1khz"])
def test_log_mel_equals_librosa_within_2e_3(name):
    waveform, expected = REFERENCE[f"{name}.waveform"], REFERENCE[f"{name}.log_mel"]  # [T], [128, frames]
    features = LogMel()(waveform[None])[0]
    assert features.shape == expected.shape == (128, LogMel().frames(waveform.shape[0]))
    torch.testing.assert_close(features, expected, rtol=0, atol=2e-3)


def test_a_batch_gives_each_clip_its_own_features():
    waveforms = torch.stack([REFERENCE["clip0.waveform"], REFERENCE["clip1.waveform"]])  # [2, 9600]
    together = LogMel()(waveforms)
    assert together.shape == (2, 128, 1 + (9600 - 512) // 160)
    torch.testing.assert_close(together[1], LogMel()(waveforms[1:])[0])


def test_a_sine_peaks_in_the_filter_centred_nearest_its_frequency():
    features = LogMel()(REFERENCE["sine_1khz.waveform"][None])[0]  # [128, frames]
    top = hz_to_mel(torch.tensor(8000.0, dtype=torch.float64))
    centres = mel_to_hz(torch.linspace(0.0, float(top), 130, dtype=torch.float64))[1:-1]  # [128] Hz
    assert features.mean(dim=1).argmax() == (centres - 1000.0).abs().argmin()


def test_filters_are_triangles_that_overlap_by_half():
    filters = mel_filterbank(16_000, 512, 128)  # [128, 257]
    assert filters.min() >= 0 and filters.max() <= 1
    # between the first and the last centre, rising and falling edges add up to 1 (a partition of unity)
    top = hz_to_mel(torch.tensor(8000.0, dtype=torch.float64))
    first, last = mel_to_hz(torch.linspace(0.0, float(top), 130, dtype=torch.float64))[[1, -2]]
    bins = torch.linspace(0, 8000, 257, dtype=torch.float64)
    covered = filters.sum(dim=0)[(bins >= first) & (bins <= last)]
    torch.testing.assert_close(covered, torch.ones_like(covered), rtol=0, atol=1e-5)


def test_mel_scale_round_trips():
    hz = torch.tensor([0.0, 440.0, 1000.0, 8000.0], dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(hz)), hz)
    assert abs(hz_to_mel(torch.tensor(1000.0)).item() - 1000.0) < 0.1  # HTK: 1 kHz is about 1000 mel
