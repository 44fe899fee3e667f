"""Decoding a batch's JPEGs on the device (nvJPEG on CUDA), with a counted CPU fallback.

With `data.decode_on: device` a data worker reads the tar bytes and an image's header only: the
bounds of `limoe.data.images` (pixels, aspect ratio) are checked there, before anything is decoded,
and the crop's region is chosen from the header's size. The batch carries the encoded files
(`Encoded`, inside an `Uncropped` whose pixels are still empty) and `crop_on_device` calls
`decode_regions` before it resizes: `torchvision.io.decode_jpeg` decodes the batch on the device (nvJPEG; libjpeg-turbo on a
CPU-only run, where the main process is the device), and each crop's region is cut out and, for an
image much larger than the crop needs, shrunk by the integer factor a worker would reduce it by.
nvJPEG decodes at full size only, and the bounds allow a 67-megapixel photo (200 MB decoded), so the
batch is decoded in groups of consecutive images whose full-size pixels stay within
`DEVICE_DECODE_BYTES`, each group cut down to its regions before the next is decoded: that bounds
the full-size pixels held at once whatever the batch holds (`limoe plan` counts it).

What the device cannot decode is decoded on the CPU with PIL instead, exactly as a data worker
would (`decode_rgb`), image by image: PNG and WebP files and CMYK JPEGs (known from the header,
so they never reach nvJPEG), and any JPEG the device decoder refuses (unusual progressive files,
for instance). Every such image is counted in `FALLBACKS` by reason, the count is logged as it
doubles and it is part of the loader's `bad_samples.summary()`: never silent. A file whose header
is sound but whose body neither decoder can read is counted as `bad_image` and trains as a
mid-grey image of its size (the batch keeps its size; the sample cannot be dropped after the
worker has batched it).

torchvision's CPU `decode_jpeg` and PIL both decode with libjpeg-turbo and give the same pixels
(tests/data/test_device_decode.py checks them bit for bit); how far nvJPEG's output is from them
is still to be measured on a GPU.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from limoe.data.images import Header, UnusableImage, decode_rgb

logger = logging.getLogger(__name__)

GREY = 128  # what an image neither decoder can read becomes
DEVICE_MODES = ("RGB", "L")  # JPEGs nvJPEG decodes: YCbCr (which PIL reports as RGB) and greyscale
# Full-size decoded pixels held at once on the device: 170 megapixels, hundreds of typical web photos
# per nvJPEG call, and more than the largest image the bounds allow (3 × MAX_PIXELS bytes).
DEVICE_DECODE_BYTES = 512 * 2**20


class Region(NamedTuple):
    """The pixels of a decoded image a crop reads (top, left, height, width), whole pixels."""

    top: int
    left: int
    height: int
    width: int


@dataclass
class Encoded:
    """A batch's images before decoding: the files, whether the device may try each, and the region
    of each decoded image that the crop reads. Not a tensor or a tuple, so the copy to the device
    leaves it on the host, where the decoders read it."""

    files: list[bytes]
    on_device: list[bool]  # a baseline or progressive JPEG in YCbCr or greyscale; else `cpu_reasons`
    cpu_reasons: list[str]  # why the device is not tried: "" where it is
    regions: list[Region]
    sizes: list[tuple[int, int]]  # (height, width) of each full decoded image, from its header
    min_side: int  # the shorter side the crop needs: larger images are reduced towards it, as workers do


def cpu_decode_reason(header: Header) -> str:
    """Why the image of `header` goes to the CPU without trying the device: "" for a JPEG the
    device may decode, else the format (png, webp) or the JPEG's colour space (cmyk, ycck)."""
    if header.format != "JPEG":
        return (header.format or "unknown").lower()
    return "" if header.mode in DEVICE_MODES else header.mode.lower()


@dataclass
class DecodeFallbacks:
    """Images decoded on the CPU instead of the device in this process, by reason."""

    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, reason: str) -> None:
        before = self.total
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.total.bit_length() > before.bit_length():  # log at 1, 2, 4, 8, … images
            logger.warning("data: %s; the latest: %s", self.summary(), reason)

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.counts.items()))
        return f"{self.total} images decoded on the CPU instead of the device ({reasons})"


FALLBACKS = DecodeFallbacks()

Decoder = Callable[[list[Tensor], torch.device], list[Tensor]]  # files → [3, H, W] uint8 images on the device


def device_jpeg_decoder(files: list[Tensor], device: torch.device) -> list[Tensor]:
    """torchvision's decode_jpeg on `device`: nvJPEG for CUDA, libjpeg-turbo for a CPU."""
    return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)


def decode_regions(encoded: Encoded, device: torch.device, decoder: Decoder = device_jpeg_decoder,
                   budget: int = DEVICE_DECODE_BYTES) -> tuple[list[Tensor], list[int]]:
    """[h, w, 3] uint8 on `device`: each image's region, decoded by `decoder` where the device may
    try it (in groups of at most `budget` full-size bytes), else (or when it fails) on the CPU,
    counted in FALLBACKS; and the integer factor each region was reduced by. As a worker reduces an
    image whose shorter side is at least twice `min_side` (`decode_rgb`), the region is shrunk by a
    box filter, so that a batch's padded pixels stay as small as a worker-decoded batch's whatever
    size the photos are stored at."""
    cut: dict[int, tuple[Tensor, int]] = {}
    tried = [i for i, ok in enumerate(encoded.on_device) if ok]
    for group in decode_groups([3 * height * width for height, width in (encoded.sizes[i] for i in tried)], budget):
        indices = [tried[g] for g in group]
        for i, image in zip(indices, _decode_on_device(encoded, indices, device, decoder)):
            if image is not None:
                cut[i] = _region(image, encoded.regions[i], encoded.min_side)
    for i, reason in enumerate(encoded.cpu_reasons):
        if i not in cut:
            image = _decode_on_cpu(encoded.files[i], encoded.regions[i], reason or "device_decode_failed", device)
            cut[i] = _region(image, encoded.regions[i], encoded.min_side)
    regions, factors = zip(*(cut[i] for i in range(len(encoded.files))))
    return list(regions), list(factors)


def decode_groups(image_bytes: list[int], budget: int) -> list[list[int]]:
    """Consecutive positions of `image_bytes` grouped greedily so that each group's total stays
    within `budget`; an image larger than the budget is a group of its own."""
    groups: list[list[int]] = []
    total = 0
    for position, size in enumerate(image_bytes):
        if not groups or total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(position)
        total += size
    return groups


def _region(image: Tensor, region: Region, min_side: int) -> tuple[Tensor, int]:
    """The [h, w, 3] crop region of a decoded [3, H, W] image, reduced as a worker would reduce the
    image, and the factor it was reduced by."""
    factor = max(min(image.shape[1:]) // min_side, 1)
    top, left, height, width = region
    return _reduced(image[:, top : top + height, left : left + width], factor).permute(1, 2, 0), factor


def _reduced(image: Tensor, factor: int) -> Tensor:
    """[3, h, w] uint8 shrunk `factor` times by a box filter, as PIL's `reduce` (a partial box at
    the edge averages the pixels it holds)."""
    if factor == 1:
        return image
    return F.avg_pool2d(image[None].float(), factor, ceil_mode=True)[0].round_().to(torch.uint8)


def _decode_on_device(encoded: Encoded, indices: list[int], device: torch.device, decoder: Decoder) -> list:
    """The images at `indices`, all in one call; if that fails, one by one, None where one fails."""
    if not indices:
        return []
    files = [torch.frombuffer(bytearray(encoded.files[i]), dtype=torch.uint8) for i in indices]
    try:
        return decoder(files, device)
    except RuntimeError:
        pass
    images = []
    for file in files:
        try:
            images.append(decoder([file], device)[0])
        except RuntimeError:
            images.append(None)
    return images


def _decode_on_cpu(file: bytes, region: Region, reason: str, device: torch.device) -> Tensor:
    """[3, H, W] uint8 on `device`, decoded by PIL as a data worker decodes; mid-grey where even
    that fails (counted as bad_image)."""
    try:
        image = torch.from_numpy(np.array(decode_rgb(io.BytesIO(file)))).permute(2, 0, 1)  # [3, H, W]
        FALLBACKS.record(reason)
    except UnusableImage:
        FALLBACKS.record("bad_image")
        image = torch.full((3, region.top + region.height, region.left + region.width), GREY, dtype=torch.uint8)
    return image.to(device)
