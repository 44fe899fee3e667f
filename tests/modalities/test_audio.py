"""Audio as the tower's third modality: the embedder's tokens against a hand-built patch grid, the
normalisation defaults against the demo clips, and the preprocessing of files (an image-text-audio
model against the image-text model with the same weights, audio alone against audio beside text,
and model files are in test_registry.py, with video's)."""

import glob
import hashlib
import tarfile

import numpy as np
import pytest
import torch

import limoe
from limoe.config import load_config, load_model_config
from limoe.data.audio import decode_clip
from limoe.errors import LimoeError
from limoe.modalities.log_mel import LogMel
from limoe.model.tower import Limoe, build_model

# 48 mel bins and 0.37 s at 16 kHz: 5920 samples → 1 + (5920 − 512) // 160 = 34 frames, so two
# 16-frame patches along time with 2 frames cropped, and 3 along frequency: 6 tokens.
ODD = ["audio.n_mels=48", "audio.patch_size=16", "audio.clip_seconds=0.37", "modalities=[image, text, audio]"]


def _demo_clips() -> list[np.ndarray]:
    """Every clip of data_shards/audio_train, decoded as the model reads them (1 s, centre)."""
    clips = []
    for path in sorted(glob.glob("data_shards/audio_train/*.tar.gz")):
        with tarfile.open(path) as tar:
            clips += [decode_clip(tar.extractfile(m).read(), 16000, 1.0, "centre") for m in tar if m.name.endswith(".flac")]
    return clips


def test_normalisation_defaults_are_the_demo_clips_statistics():
    """How `model.audio.mean` and `std` were measured (their descriptions name this test)."""
    clips = _demo_clips()
    features = LogMel()(torch.from_numpy(np.stack(clips))).double()  # [288, 128, 97]
    defaults = load_model_config("limoe-tiny").audio
    assert len(clips) == 288
    assert features.mean().item() == pytest.approx(defaults.mean, abs=0.005)
    assert features.std().item() == pytest.approx(defaults.std, abs=0.005)


def test_audio_tokens_are_the_spectrogram_patches_time_major_with_their_positions():
    torch.manual_seed(0)
    config = load_model_config("limoe-tiny", ODD)
    assert (config.audio.clip_samples, config.audio.frames, config.audio.num_patches) == (5920, 34, 6)
    model = Limoe(config)
    embedder = model.embedders["audio"]
    waveforms = torch.randn(2, 5920)
    tokens = model.embed("audio", waveforms)
    assert tokens.x.shape == (2, 6, config.width) and tokens.key_mask is None and tokens.name == "audio"
    assert tokens.modality.tolist() == [[2] * 6] * 2  # audio is the model's third modality
    # by hand: normalised log-mel, patch (f, t) = rows 16f.., frames 16t..; token order t-major
    features = (LogMel(16000, 48)(waveforms) - config.audio.mean) / config.audio.std  # [2, 48, 34]
    kernel, bias = embedder.patch_embed.weight[:, 0], embedder.patch_embed.bias  # [d, 16, 16], [d]
    expected = torch.stack([torch.einsum("bij,dij->bd", features[:, 16 * f: 16 * f + 16, 16 * t: 16 * t + 16], kernel)
                            + bias for t in range(2) for f in range(3)], dim=1) + model.audio_positions  # [2, 6, d]
    torch.testing.assert_close(tokens.x, expected, atol=1e-4, rtol=1e-4)
    # the 2 cropped frames start at sample 32·160 = 5120 and frame 31 ends at 31·160 + 512 = 5472
    changed = waveforms.clone()
    changed[:, 5472:] = torch.randn(2, 5920 - 5472)
    assert torch.equal(model.embed("audio", changed).x, tokens.x)
    # a shorter clip (one patch along time: 16 frames = 512 + 15·160 samples) takes the first positions
    short = waveforms[:, : 512 + 15 * 160]
    torch.testing.assert_close(model.embed("audio", short).x, tokens.x[:, :3])
    # gradients reach the convolution and the positions
    model.embed("audio", waveforms).x.square().sum().backward()
    for parameter in (embedder.patch_embed.weight, embedder.patch_embed.bias, model.audio_positions):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_kept_patches_and_the_class_token_work_as_for_images():
    torch.manual_seed(0)
    model = Limoe(load_model_config("limoe-tiny", [*ODD, "audio.pool=cls"]))
    waveforms = torch.randn(2, 5920)
    every = model.embed("audio", waveforms).x  # [2, 1 + 6, d]
    keep = torch.tensor([[5, 0], [2, 3]])
    kept = model.embed("audio", waveforms, keep=keep).x  # [2, 1 + 2, d]
    assert torch.equal(kept[:, 0], model.audio_cls_token[0].expand(2, -1))
    assert torch.equal(kept[:, 1:], torch.stack([every[0, 1:][[5, 0]], every[1, 1:][[2, 3]]]))


@pytest.mark.parametrize("samples, patches", [(600, 0), (9000, 3)])  # 1 and 54 frames: 0 and 3 patches along time
def test_a_clip_too_short_for_a_patch_or_longer_than_the_positions_is_one_line(samples, patches):
    model = Limoe(load_model_config("limoe-tiny", ODD))
    with pytest.raises(LimoeError, match=f"a clip of {samples} samples gives {patches} patches along time; this model "
                                         f"reads clips of one patch up to model.audio.clip_seconds"):
        model.embed("audio", torch.randn(1, samples))


def test_a_modality_the_model_lacks_is_one_line():
    model = Limoe(load_model_config("limoe-tiny"))
    with pytest.raises(LimoeError, match="this model embeds image, text, not audio"):
        model.encode_audio(torch.randn(1, 16000))


def test_default_models_build_exactly_the_weights_they_built_before_audio():
    """build_model's seeded state dict of the demo recipe, as the code before audio built it
    (digest of every name and tensor's bytes in order, recorded from that code on 2026-12-06)."""
    torch.manual_seed(0)
    model = build_model(load_config("demo"))
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest() == "e50b6bbcefc842c7338f3d9363c95a7a0ecd93c4130955ad5a5ef4fe8793f1a7"


def test_preprocess_audio_reads_a_file_or_its_bytes_as_the_model_s_input(tmp_path):
    model = Limoe(load_model_config("limoe-tiny", ["modalities=[text, audio]", "audio.clip_seconds=0.5"]))
    with tarfile.open("data_shards/audio_heldout/00000.tar.gz") as tar:
        member = next(m for m in tar if m.name.endswith(".flac"))
        data = tar.extractfile(member).read()
    (tmp_path / "clip.flac").write_bytes(data)
    expected = torch.from_numpy(decode_clip(data, 16000, 0.5, "centre"))  # [8000]
    assert torch.equal(limoe.preprocess_audio(data, model), expected)
    assert torch.equal(limoe.preprocess_audio(tmp_path / "clip.flac", model), expected)
    assert model.encode_audio(expected[None]).shape == (1, model.config.embed_dim)
    (tmp_path / "notes.flac").write_text("not audio")
    with pytest.raises(LimoeError, match="notes.flac could not be read as audio"):
        limoe.preprocess_audio(tmp_path / "notes.flac", model)
