"""open_clip's entry points for limoe models: `create_model_and_transforms`, `get_tokenizer`,
`list_models`, `preprocess_audio` for a model with audio and `preprocess_video` for one with video.

One string names a model, as in open_clip: a model config name (`limoe-b16`, random weights), a
model config `.yaml`, an exported `.safetensors` file, a training workdir, a model folder in
Hugging Face layout, or `hf-hub:org/name`:

    import limoe
    model, preprocess_train, preprocess_val = limoe.create_model_and_transforms("hf-hub:org/limoe-b16")
    tokenizer = limoe.get_tokenizer("hf-hub:org/limoe-b16")
    image_features = model.encode_image(preprocess_val(image)[None])   # [1, D], L2-normalised
    text_features = model.encode_text(tokenizer(["a photo of a cat"]))  # [1, D]
    output = model(images, tokens)
    image_features, text_features, logit_scale = output  # open_clip's tuple (SigLIP: logit_bias fourth)
    output.routing   # one record per MoE block: what the auxiliary losses are computed from

A model whose config's `model.modalities` include audio also encodes sounds; `preprocess_audio`
turns a file (path or bytes: FLAC, WAV, Ogg, Opus, MP3) into its input, the centre
`model.audio.clip_seconds` as mono float32 at `model.audio.sample_rate`:

    audio_features = model.encode_audio(limoe.preprocess_audio("dog.flac", model)[None])  # [1, D]

A model with video encodes clips of frames; `preprocess_video` applies the images' eval transform
(`preprocess_val`) to each frame of a clip, the model.video.frames frames the data pipeline samples
(or fewer, a multiple of model.video.tubelet_frames):

    video_features = model.encode_video(limoe.preprocess_video(frames, model)[None])  # [1, D]

As open_clip's, `create_model(..., output_dict=True)` makes `model(images, tokens)` return open_clip's
dict (image_features, text_features, logit_scale and, for SigLIP, logit_bias) instead.

Models come back in eval mode (`model.train()` before fine-tuning): for a MoE model that switches
off the router noise and applies the eval capacity factor, which `capacity_factor` overrides
(a number or 'dropless').
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from open_clip.tokenizer import SimpleTokenizer
from torchvision.transforms import Compose

from limoe.checkpoints import load_model, read_config, with_eval_capacity
from limoe.checkpoints.hub import is_hub_reference
from limoe.config import CONFIG_DIR, Config, load_model_config
from limoe.data.audio import UnusableAudio, decode_clip
from limoe.data.preprocess import image_transform, tokenizer
from limoe.errors import LimoeError
from limoe.model.tower import Limoe, build_model

if TYPE_CHECKING:
    from PIL import Image


def list_models() -> list[str]:
    """The model config names `create_model_and_transforms` builds with random weights."""
    return sorted(path.stem for path in (CONFIG_DIR / "models").glob("*.yaml"))


def _names_a_config(name_or_path: str) -> bool:
    """A model config (random weights), else a checkpoint; a name that is neither is an error."""
    if name_or_path in list_models() or Path(name_or_path).suffix in (".yaml", ".yml"):
        return True
    if not is_hub_reference(name_or_path) and not Path(name_or_path).exists():
        raise LimoeError(
            f"{name_or_path!r} is neither a model config ({', '.join(list_models())}) nor an existing checkpoint "
            f"file or folder; hub models are named hf-hub:org/name."
        )
    return False


def _config(name_or_path: str, cache_dir: Optional[str]) -> Config:
    if _names_a_config(name_or_path):
        return Config(model=load_model_config(name_or_path))
    return read_config(name_or_path, cache_dir)


def create_model(name_or_path: str, device: str = "cpu", capacity_factor: Optional[str] = None,
                 cache_dir: Optional[str] = None, output_dict: bool = False) -> Limoe:
    """The model, in eval mode on `device`: random weights for a config, else the checkpoint's.
    `cache_dir` is huggingface_hub's cache for `hf-hub:` names (default: its own); `output_dict`
    makes its forward return open_clip's dict rather than the tuple."""
    if _names_a_config(name_or_path):
        config = with_eval_capacity(Config(model=load_model_config(name_or_path)), capacity_factor)
        model = build_model(config).to(device).eval()
    else:
        model = load_model(name_or_path, device, capacity_factor, cache_dir)[0]
    model.output_dict = output_dict
    return model


def create_model_and_transforms(name_or_path: str, device: str = "cpu", capacity_factor: Optional[str] = None,
                                cache_dir: Optional[str] = None,
                                output_dict: bool = False) -> tuple[Limoe, Compose, Compose]:
    """(model, preprocess_train, preprocess_val) as open_clip returns them: the transforms take a
    PIL image to the model's resolution (train: random resized crop; val: resize and center crop)."""
    model = create_model(name_or_path, device, capacity_factor, cache_dir, output_dict)
    size = model.config.image_size
    return model, image_transform(size, train=True), image_transform(size, train=False)


def preprocess_audio(source: Union[str, Path, bytes], model: Limoe) -> torch.Tensor:
    """An audio file (its path or its bytes) → `model`'s input [T] float32: the centre
    model.audio.clip_seconds mixed to mono and resampled to model.audio.sample_rate, zero-padded when
    shorter (as evaluation crops clips). Stack clips to [B, T] for `model.encode_audio`."""
    audio = model.config.audio
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        clip = decode_clip(data, audio.sample_rate, audio.clip_seconds, "centre")
    except UnusableAudio as problem:
        name = "the audio bytes" if isinstance(source, bytes) else str(source)
        raise LimoeError(f"{name} could not be read as audio ({problem.args[0]}); give a FLAC, WAV, Ogg, Opus or "
                         f"MP3 file holding sound.") from None
    return torch.from_numpy(clip)


def preprocess_video(frames: Sequence[Image.Image], model: Limoe) -> torch.Tensor:
    """A clip's frames (PIL images, in time order) → `model`'s input [T, 3, S, S] float32: each frame
    through the images' eval transform at model.image_size (resize, centre crop, normalise), as
    `preprocess_val` makes an image. Stack clips to [B, T, 3, S, S] for `model.encode_video`."""
    if not frames:
        raise LimoeError("preprocess_video was given no frames; give the clip's frames as a list of PIL images.")
    transform = image_transform(model.config.image_size, train=False)
    return torch.stack([transform(frame) for frame in frames])  # [T, 3, S, S]


def get_tokenizer(name_or_path: str, cache_dir: Optional[str] = None) -> SimpleTokenizer:
    """open_clip's BPE tokenizer cut to the model's context length: list of str → [B, L] int64."""
    return tokenizer(_config(name_or_path, cache_dir).model.context_length)
