"""Decoding untrusted image bytes at a bounded cost.

A few hundred bytes of PNG can decode to gigapixels (a decompression bomb), or to a sliver such
as 60000×1 that resizing the shorter side to 224 px turns into a 13-gigapixel image. The size is
read from the file's header, before any pixel is decoded or resized, and checked against two
bounds; an image beyond them is skipped and counted like any other bad sample.

Pixels that the crop would throw away are not decoded: given the smallest shorter side the crop
needs, a JPEG much larger than that is decoded at 1/2, 1/4 or 1/8 scale by its DCT (PIL's
`draft`, which costs a fraction of a full decode), and any other format is shrunk by an integer
box filter (`reduce`) before anything else touches it.
"""

from __future__ import annotations

import io
from typing import BinaryIO, NamedTuple, Optional, Union
from pathlib import Path

from PIL import Image


MAX_PIXELS = 8192 * 8192  # 67 megapixels: 200 MB decoded, beyond any photo a crawl keeps at full size
MAX_ASPECT_RATIO = 20  # long side / short side: panoramas pass, slivers do not


class UnusableImage(Exception):
    """An image that is skipped; `args[0]` is the reason counted: bad_image, image_too_large or
    image_aspect_ratio."""


class Header(NamedTuple):
    """What an image file's header says, read without decoding a pixel."""

    size: tuple[int, int]  # (width, height), as PIL gives it
    format: str  # PIL's format name: JPEG, PNG, WEBP
    mode: str  # the decoded mode: RGB (a YCbCr JPEG), L, CMYK, RGBA, P, …


def read_header(data: bytes) -> Header:
    """The header of the image file `data`, within the bounds, or UnusableImage."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_bounds(image)
            return Header(image.size, image.format, image.mode)
    except UnusableImage:
        raise
    except Exception:  # as decode_rgb: many exception types for untrusted bytes
        raise UnusableImage("bad_image") from None


def _check_bounds(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise UnusableImage("image_too_large")
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise UnusableImage("image_aspect_ratio")


def decode_rgb(source: Union[str, Path, BinaryIO], min_side: Optional[int] = None) -> Image.Image:
    """The RGB image in `source` (a path or a binary file object), or UnusableImage. With
    `min_side`, an image whose shorter side is at least twice that is decoded or reduced by an
    integer factor, its shorter side staying at least `min_side`."""
    try:
        with Image.open(source) as image:
            _check_bounds(image)
            if min_side is None:
                return to_rgb(image)
            image.draft(None, (min_side, min_side))  # JPEG only: sets the DCT scale before decoding
            rgb, factor = to_rgb(image), min(image.size) // min_side
            return rgb.reduce(factor) if factor > 1 else rgb
    except UnusableImage:
        raise
    except Exception:  # decoders for untrusted bytes raise many types (OSError, SyntaxError, struct.error, …)
        raise UnusableImage("bad_image") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white rather than dropped, which would show
    whatever colour the transparent pixels happen to hold (often black)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
