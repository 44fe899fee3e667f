"""Where training images are cropped and resized: in the data worker, or on the device.

The crop is open_clip's `RandomResizedCrop` (scale 0.9–1, aspect 3/4–4/3, bicubic with
antialiasing); `draw_box` draws its boxes from the same distribution, and both places crop them.

- `data.resize_on: worker`: the worker resizes each box with PIL (`crop_in_worker`), exactly
  open_clip's training transform, and batches [B, 3, S, S] uint8.
- `data.resize_on: device`: the worker only decodes and draws the box. The batch carries the
  pixels around each box (`Uncropped`: padded to a common size, the last row and column repeated)
  and the boxes; `crop_on_device` resizes them all with one `torchvision.ops.roi_align` on the GPU
  (on a CPU-only run, in the main process, where it costs several times PIL's resize) and hands
  back the same [B, 3, S, S] uint8. A resize is about 40% of a worker's time at 224 px, which
  moves off the CPU.

The two resizes are not the same filter: roi_align averages ⌈box/S⌉² bilinear samples per output
pixel (area averaging that antialiases a downscale), PIL's is an antialiased bicubic. On photo-like images the
crops of the same box differ by under 1 grey level on average (of 255) and by a few levels at
most, a PSNR above 40 dB; `tests/data/test_crops.py` checks this image by image.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as F

from limoe.data.preprocess import image_transform


class Box(NamedTuple):
    """A crop in pixels of the decoded image, as torchvision's `get_params` draws it."""

    top: int
    left: int
    height: int
    width: int


class Uncropped(NamedTuple):
    """A batch's images before their crop and resize, which `crop_on_device` makes."""

    pixels: Tensor  # [B, H, W, 3] uint8: the region around each box at the top left, edges repeated
    boxes: Tensor  # [B, 4] float32 (x0, y0, x1, y1) of each crop in its region's pixels
    output_size: int  # S: the crops are S × S


@functools.lru_cache(maxsize=None)
def _random_resized_crop(image_size: int) -> RandomResizedCrop:
    return next(t for t in image_transform(image_size, train=True).transforms if isinstance(t, RandomResizedCrop))


def min_decoded_side(image_size: int) -> int:
    """The shorter side an image may be decoded at without its smallest possible crop (scale 0.9
    of the area at aspect 3/4) having fewer than `image_size` pixels across."""
    crop = _random_resized_crop(image_size)
    return math.ceil(image_size / math.sqrt(crop.scale[0] * crop.ratio[0]))


def largest_region_side(image_size: int) -> int:
    """A bound on the side of the pixels a device crop ships, for memory checks: a decoded image's
    shorter side stays below twice `min_decoded_side` (`decode_rgb` reduces it otherwise), a box's
    longer side is at most 4/3 of its shorter one, and a region adds a pixel on each side."""
    return math.ceil(4 / 3 * 2 * min_decoded_side(image_size)) + 2


def draw_box(image: Image.Image, image_size: int, tries: int = 10) -> Box:
    """A random crop of `image` from the distribution of RandomResizedCrop.get_params (its `tries`
    draws of area and log-aspect, then a uniform position, else its central fallback), with all
    the torch generator's numbers drawn in one call: get_params's per-number tensor calls cost
    about as much as decoding a 256 px JPEG."""
    crop = _random_resized_crop(image_size)
    width, height = image.size
    (low, high), (log_low, log_high) = crop.scale, (math.log(crop.ratio[0]), math.log(crop.ratio[1]))
    for u_area, u_aspect, u_top, u_left in torch.rand(tries, 4, dtype=torch.float64).tolist():
        area = width * height * (low + u_area * (high - low))
        aspect = math.exp(log_low + u_aspect * (log_high - log_low))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return Box(int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w)
    w, h = width, height  # the central crop closest to the allowed aspect ratios
    if width / height < min(crop.ratio):
        h = round(w / min(crop.ratio))
    elif width / height > max(crop.ratio):
        w = round(h * max(crop.ratio))
    return Box((height - h) // 2, (width - w) // 2, h, w)


def crop_in_worker(image: Image.Image, box: Box, image_size: int) -> np.ndarray:
    """[S, S, 3] uint8: `box` of `image` resized with PIL, as RandomResizedCrop does it."""
    crop = _random_resized_crop(image_size)
    return np.asarray(F.resized_crop(image, *box, crop.size, crop.interpolation, antialias=crop.antialias))


def stack_crops(crops: list[np.ndarray]) -> Tensor:
    """[S, S, 3] uint8 arrays → [B, 3, S, S] uint8, each copied once into the batch."""
    batch = torch.empty((len(crops), 3, *crops[0].shape[:2]), dtype=torch.uint8)
    for slot, crop in zip(batch.numpy(), crops):  # the batch's memory
        slot[...] = crop.transpose(2, 0, 1)
    return batch


def region_around(image: Image.Image, box: Box) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The pixels a device crop of `box` reads ([h, w, 3] uint8, a view of the decoded image: the
    box and one pixel around it where the image has one) and the box (x0, y0, x1, y1) in them.
    Shipping the region rather than the whole image keeps a padded batch small whatever the
    images' aspect ratios."""
    top, left = max(box.top - 1, 0), max(box.left - 1, 0)
    bottom, right = min(box.top + box.height + 1, image.height), min(box.left + box.width + 1, image.width)
    region = np.asarray(image)[top:bottom, left:right]
    x0, y0 = box.left - left, box.top - top
    return region, (x0, y0, x0 + box.width, y0 + box.height)


def uncropped_batch(regions: list[np.ndarray], boxes: list[tuple], image_size: int) -> Uncropped:
    """Regions of different sizes in one [B, H, W, 3] uint8 tensor, each copied once. The padding
    repeats a region's last row and column, so roi_align's bilinear samples at a box's far edge
    read the image's edge, not zeros."""
    height, width = max(r.shape[0] for r in regions), max(r.shape[1] for r in regions)
    pixels = torch.empty((len(regions), height, width, 3), dtype=torch.uint8)
    padded = pixels.numpy()  # the same memory
    for slot, region in zip(padded, regions):
        h, w = region.shape[:2]
        slot[:h, :w] = region
        slot[h:, :w] = region[-1:]
        slot[:, w:] = slot[:, w - 1 : w]
    return Uncropped(pixels, torch.tensor(boxes, dtype=torch.float32), image_size)


def crop_on_device(uncropped: Uncropped) -> Tensor:
    """[B, 3, S, S] uint8 crops, on the device `uncropped` is on, in one batched op."""
    pixels = uncropped.pixels.permute(0, 3, 1, 2).float()  # [B, 3, H, W]
    index = torch.arange(len(pixels), device=pixels.device, dtype=torch.float32)[:, None]  # [B, 1]
    rois = torch.cat([index, uncropped.boxes], dim=1)  # [B, 5] (image, x0, y0, x1, y1)
    size = uncropped.output_size
    # aligned: pixel centres at +0.5, as PIL's; sampling_ratio -1: ⌈box/S⌉ samples per output pixel
    crops = roi_align(pixels, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return crops.round_().clamp_(0, 255).to(torch.uint8)
