"""Decoding untrusted video bytes into the fixed-length clips of square frames the model reads.

A shard's clip is a video file (`KEY.mp4`, `KEY.webm`), decoded with PyAV — imported only when
such a file is read, so limoe without video does not need it — or a filmstrip (`KEY.png`,
`KEY.jpg`): square frames side by side from left to right, as many as the width holds heights
(a 256×32 strip is 8 frames of 32×32). Filmstrips need nothing beyond Pillow and keep small
synthetic sets (the demo's moving sprites) small.

Time: `frames` frames are taken `stride` source frames apart, spanning (frames − 1)·stride + 1
source frames — a random window in training, the centre one in evaluation, as audio clips are
cropped. A clip shorter than the span repeats its last frame to fill the window, as a short audio
clip is padded at its end: real sets mix lengths, and refusing short clips would drop a set's
shortest actions wholesale. A clip with no frame at all is a bad sample.

Space is cropped by `limoe.data.crops.crop_clip`: one box for every frame of a clip.

A file that does not decode, holds no video stream, no frame, or more pixels per frame than an
image may have is skipped and counted like a corrupt image (`UnusableVideo`'s reason is the
count's name).
"""

from __future__ import annotations

import io
import random
from typing import Literal, Optional

from PIL import Image

from limoe.data.images import MAX_PIXELS, to_rgb
from limoe.errors import LimoeError

VIDEO_EXTENSIONS = ("mp4", "webm", "png", "jpg")  # the shard members read as video, preferred first
VIDEO_FILE_EXTENSIONS = ("mp4", "webm")  # those PyAV decodes; the others are filmstrips
FILMSTRIP_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG: the strip formats, told by their bytes


class UnusableVideo(Exception):
    """A clip that is skipped; `args[0]` is the reason counted: bad_video, empty_video or video_too_large."""


def frame_indices(count: int, frames: int, stride: int, crop: Literal["random", "centre"],
                  rng: Optional[random.Random] = None) -> list[int]:
    """The source frames a clip of `count` frames gives: `frames` indices `stride` apart, from a
    random start (`rng`) or the centred one; past the clip's end, its last frame again."""
    span = (frames - 1) * stride + 1
    slack = max(count - span, 0)
    start = (rng or random).randint(0, slack) if crop == "random" else slack // 2
    return [min(start + step * stride, count - 1) for step in range(frames)]


def decode_frames(data: bytes, frames: int, stride: int, crop: Literal["random", "centre"],
                  rng: Optional[random.Random] = None) -> list[Image.Image]:
    """The `frames` RGB frames of the window `frame_indices` picks from the clip in `data` (a
    video file, or a PNG/JPEG filmstrip), or UnusableVideo."""
    if data.startswith(FILMSTRIP_SIGNATURES):
        strip = _open_filmstrip(data)
        height = strip.height
        wanted = frame_indices(strip.width // height, frames, stride, crop, rng)
        return [strip.crop((index * height, 0, (index + 1) * height, height)) for index in wanted]
    return _decode_video_file(data, frames, stride, crop, rng)


def count_frames(data: bytes) -> tuple[int, int, int]:
    """(frames, width, height) of the clip in `data`, read without decoding a video file's
    pictures (its packets are counted), or UnusableVideo."""
    if data.startswith(FILMSTRIP_SIGNATURES):
        strip = _open_filmstrip(data, load=False)
        return strip.width // strip.height, strip.height, strip.height
    av = require_pyav()
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = sum(1 for packet in container.demux(stream) if packet.size)
            width, height = stream.codec_context.width, stream.codec_context.height
    except Exception:  # FFmpeg reports malformed input through many error types; no stream is an IndexError
        raise UnusableVideo("bad_video") from None
    if frames == 0:
        raise UnusableVideo("empty_video")
    if width * height > MAX_PIXELS:
        raise UnusableVideo("video_too_large")
    return frames, width, height


def require_pyav():
    """The `av` module, or the one line that says how to install it."""
    try:
        import av
    except ImportError:
        raise LimoeError("reading mp4 or webm video needs PyAV, which is not installed: pip install av") from None
    return av


def _open_filmstrip(data: bytes, load: bool = True) -> Image.Image:
    """The strip as RGB (or, without `load`, only its header read), with at least one square
    frame and no more pixels than an image may have."""
    try:
        strip = Image.open(io.BytesIO(data))
        width, height = strip.size
        if width * height > MAX_PIXELS:
            raise UnusableVideo("video_too_large")
        if height == 0 or width < height:
            raise UnusableVideo("empty_video")
        return to_rgb(strip) if load else strip
    except UnusableVideo:
        raise
    except Exception:  # as images.decode_rgb: decoders for untrusted bytes raise many types
        raise UnusableVideo("bad_video") from None


def _decode_video_file(data: bytes, frames: int, stride: int, crop: Literal["random", "centre"],
                       rng: Optional[random.Random]) -> list[Image.Image]:
    """Frames of a video file: the packets are counted first, so that the window is known before
    decoding, and decoding stops at the window's last frame. Should the file decode to fewer
    frames than it has packets, the window's later frames repeat the last one decoded."""
    count, _, _ = count_frames(data)
    wanted = frame_indices(count, frames, stride, crop, rng)
    av = require_pyav()
    decoded: dict[int, Image.Image] = {}
    latest = None
    try:
        with av.open(io.BytesIO(data)) as container:
            for index, latest in enumerate(container.decode(video=0)):
                if index in wanted:
                    decoded[index] = latest.to_image()  # RGB
                if index == wanted[-1]:
                    break
            if latest is None:
                raise UnusableVideo("empty_video")
            last = decoded[index] if index in decoded else latest.to_image()
    except UnusableVideo:
        raise
    except Exception:  # as count_frames
        raise UnusableVideo("bad_video") from None
    return [decoded.get(index, last) for index in wanted]
