"""What an evaluation scores against text: images (the default), audio clips or video clips.

Zero-shot classification, retrieval and k-NN run the same protocol on either; what differs is
read here once: which model can take them (its `model.modalities`), how the loader reads the
shards (the eval crop of an image, the centre window of a clip at the model's rate and length,
a video clip's `model.video.frames` frames `frame_stride` apart from its centre window, each
cropped as an image is),
which embedder encodes them, and what the metrics call the inputs (`images`, `clips`). The
placement options (`resize_on`, `decode_on`) and class-folder trees are for images only.
`still_frame` (video only) evaluates each clip as its centre frame repeated: the single-frame
baseline, whose distance to the real clips' result is what the model reads from time.
"""

from __future__ import annotations

from torch import Tensor

from limoe.data.crops import eval_images_on
from limoe.errors import LimoeError
from limoe.model.tower import Limoe

EVALUATED = ("image", "audio", "video")  # the `--modality` choices
_COUNTED_AS = {"image": "images", "audio": "clips", "video": "clips"}  # the metrics' name for a number of inputs


def check_modality(model: Limoe, modality: str) -> None:
    """Refuse a modality the model does not embed (a one-line error naming the model's)."""
    if modality not in EVALUATED:
        raise LimoeError(f"modality {modality!r} cannot be evaluated; give one of {', '.join(EVALUATED)}.")
    if modality not in model.config.modalities:
        raise LimoeError(f"this checkpoint's model embeds {', '.join(model.config.modalities)}, not {modality}; "
                         f"use a checkpoint whose model.modalities include {modality}, or drop --modality "
                         f"{modality}.")


def check_placement(modality: str, resize_on: str, decode_on: str) -> None:
    """Refuse `--resize-on device` / `--decode-on device` for clips: they place image work (video
    frames are decoded and cropped in the data workers)."""
    if modality != "image" and "device" in (resize_on, decode_on):
        raise LimoeError(f"--resize-on and --decode-on place the resizing and decoding of images; {modality} clips are "
                         f"decoded in the data workers and turned into features on the device anyway: drop them "
                         f"with --modality {modality}.")


def check_still_frame(modality: str, still_frame: bool) -> None:
    """Refuse `--still-frame` for inputs without frames (images, audio clips)."""
    if still_frame and modality != "video":
        raise LimoeError(f"--still-frame repeats a video clip's centre frame, and {counted_as(modality)} have no "
                         f"frames; drop --still-frame, or give --modality video with video shards.")


def still_frames(clips: Tensor) -> Tensor:
    """clips [B, T, 3, S, S] → each clip's centre frame (index T // 2) repeated T times [B, T, 3, S, S]:
    the same picture at the same place, with no motion."""
    frames = clips.shape[1]
    return clips[:, frames // 2 : frames // 2 + 1].expand_as(clips).contiguous()


def eval_inputs(inputs: Tensor, device, still_frame: bool = False) -> Tensor:
    """An eval batch's inputs ready to embed on `device` (`limoe.data.crops.eval_images_on`), each video
    clip made its centre frame repeated with `still_frame`."""
    inputs = eval_images_on(inputs, device)
    return still_frames(inputs) if still_frame else inputs


def encode_inputs(model: Limoe, modality: str, inputs: Tensor) -> Tensor:
    """Features [B, D] (L2-normalised, float32) of images [B, 3, S, S], audio clips [B, T] or video
    clips [B, T, 3, S, S] on the
    model's device (`limoe.data.crops.eval_images_on` puts an eval batch's there)."""
    return model.encode({modality: inputs})[0][modality].float()


def labelled_set_needs(modality: str) -> str:
    """What a labelled set of `modality` is made of, for the line that says none was read."""
    if modality == "image":
        return "labelled images: class folders or shards with .cls"
    return f"labelled {counted_as(modality)}: {modality} shards with .cls"


def counted_as(modality: str) -> str:
    """What the metrics call a number of `modality`'s inputs: `images`, `clips`."""
    return _COUNTED_AS[modality]
