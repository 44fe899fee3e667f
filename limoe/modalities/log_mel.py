"""Log-mel spectrogram of a batch of waveforms, on the device.

The audio embedder's first step, as AST, PolyViT and ImageBind compute it: 25 ms Hann windows every
10 ms (at 16 kHz: 400 samples every 160, each zero-padded to a 512-point FFT), the power spectrum,
128 triangular filters evenly spaced on the HTK mel scale from 0 Hz to the Nyquist frequency, and
the natural log (a floor of 1e-6 keeps silent bins finite). Frames are not centred (as in Kaldi's
fbank, no frame is made of padding): a clip of T samples gives 1 + (T − 512) // 160 frames. It runs as part of the model, on whatever device the batch is on, so the data workers
only decode and crop.

Equal to librosa's `melspectrogram(n_fft=512, win_length=400, hop_length=160, center=False,
htk=True, norm=None, power=2)` followed by the same log, within 2e-3 (tests/modalities/test_log_mel.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from limoe.modalities.stft_sizes import frame_count, stft_sizes

LOG_FLOOR = 1e-6


def hz_to_mel(hz: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, each rising from the centre of the filter below
    to its own centre and falling to the centre of the one above (peak 1, no area normalisation)."""
    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # [F] Hz
    # a number on the CPU whatever the default device: a model built on `meta` (the names and shapes of
    # a checkpoint's entries) builds its filters too
    top = hz_to_mel(torch.tensor(sample_rate / 2, dtype=torch.float64, device="cpu"))
    edges = mel_to_hz(torch.linspace(0.0, float(top), n_mels + 2, dtype=torch.float64))  # [n_mels + 2] Hz
    widths = edges.diff()  # [n_mels + 1]
    distance = edges[:, None] - bins[None, :]  # [n_mels + 2, F] edge minus bin frequency
    rising = -distance[:-2] / widths[:-1, None]  # [n_mels, F] 0 at the left edge, 1 at the centre
    falling = distance[2:] / widths[1:, None]  # [n_mels, F] 1 at the centre, 0 at the right edge
    return torch.minimum(rising, falling).clamp(min=0.0).float()


class LogMel(nn.Module):
    """waveforms [B, T] → log-mel features [B, n_mels, frames]."""

    def __init__(self, sample_rate: int = 16_000, n_mels: int = 128, window_ms: float = 25.0, hop_ms: float = 10.0):
        super().__init__()
        self.window, self.hop, self.n_fft = stft_sizes(sample_rate, window_ms, hop_ms)
        # not persistent: derived from the config, so neither checkpoints nor a changed setting carry them
        self.register_buffer("hann", torch.hann_window(self.window), persistent=False)  # [window]
        self.register_buffer("filters", mel_filterbank(sample_rate, self.n_fft, n_mels), persistent=False)

    def frames(self, samples: int) -> int:
        """How many frames a clip of `samples` samples gives."""
        return frame_count(samples, self.hop, self.n_fft)

    def forward(self, waveforms: Tensor) -> Tensor:
        # float32 throughout, whatever the model was cast to (a bf16 model's buffers are bf16)
        spectrum = torch.stft(waveforms.float(), self.n_fft, self.hop, self.window, self.hann.float(), center=False,
                              return_complex=True)  # [B, n_fft // 2 + 1, frames]
        power = spectrum.real.square() + spectrum.imag.square()
        return torch.log(self.filters.float() @ power + LOG_FLOOR)  # [B, n_mels, frames]
