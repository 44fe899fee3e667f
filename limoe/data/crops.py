"""Where images are cropped and resized: in the data worker, or on the device.

The training crop is open_clip's `RandomResizedCrop` (scale 0.9–1, aspect 3/4–4/3, bicubic with
antialiasing); `draw_box` draws its boxes from the same distribution, and both places crop them.
The eval crop (resize the shorter side, centre crop) is one fixed box per image, at fractional
pixel positions: `centre_window` expresses it as the window of the decoded image that PIL's resize
of the whole image followed by the crop samples, and the same device op resizes it. With
`data.decode_on: device` the images arrive still encoded, and `crop_on_device` decodes them first
(`limoe.data.device_decode`).

- `data.resize_on: worker`: the worker resizes each box with PIL (`crop_in_worker`), exactly
  open_clip's training transform, and batches [B, 3, S, S] uint8.
- `data.resize_on: device`: the worker only decodes and draws the box. The batch carries each
  box's pixels (`Uncropped`, padded to a common size) and their sizes; `crop_on_device` resizes
  them all on the GPU (on a CPU-only run, in the main process) with two batched matrix products
  whose weights are PIL's antialiased bicubic ones, and hands back the same [B, 3, S, S] uint8.
  A resize is about 40% of a worker's time at 224 px, which moves off the CPU.

The two resizes are the same filter computed differently: PIL in 8-bit fixed point, a row pass
rounded to uint8 before the column pass; the device in float32 and rounded once. Crops of the same
box differ by at most a grey level or two (of 255), a few hundredths on average;
`tests/data/test_crops.py` checks this image by image.

Video clips (`crop_clip`) are cropped in the worker whatever `data.resize_on` says: one box, drawn
as an image's, for every frame of a clip.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as F

from limoe.data.device_decode import Encoded, Region, cpu_decode_reason, decode_regions
from limoe.data.images import Header
from limoe.data.preprocess import eval_crop, image_transform, normalize


class Box(NamedTuple):
    """A crop in pixels of the decoded image, as torchvision's `get_params` draws it."""

    top: int
    left: int
    height: int
    width: int


class Uncropped(NamedTuple):
    """A batch's images before their crop and resize, which `crop_on_device` makes."""

    pixels: Tensor  # [B, H, W, 3] uint8: each image's pixels at the top left, padded to the largest
    sizes: Tensor  # [B, 2] int64 (height, width) of each image's pixels
    # [B, 4] float32 (top, left, height, width): the window of each image's pixels that is resized
    # to S × S; the whole of them for a training box, a fractional centre window for evaluation
    windows: Tensor
    output_size: int  # S: the crops are S × S
    # with data.decode_on device, the encoded files, and `pixels` is empty until `crop_on_device`
    # decodes them (`sizes` and `windows` are those of the regions the crops read)
    encoded: Optional[Encoded] = None

    def to(self, device: torch.device) -> Uncropped:
        """The same batch with its tensors on `device`, copied without blocking the host."""
        return self._replace(**{name: getattr(self, name).to(device, non_blocking=True)
                                for name in ("pixels", "sizes", "windows")})


@functools.lru_cache(maxsize=None)
def _random_resized_crop(image_size: int) -> RandomResizedCrop:
    return next(t for t in image_transform(image_size, train=True).transforms if isinstance(t, RandomResizedCrop))


def min_decoded_side(image_size: int) -> int:
    """The shorter side an image may be decoded at without its smallest possible crop (scale 0.9
    of the area at aspect 3/4) having fewer than `image_size` pixels across."""
    crop = _random_resized_crop(image_size)
    return math.ceil(image_size / math.sqrt(crop.scale[0] * crop.ratio[0]))


def largest_box_side(image_size: int) -> int:
    """A bound on the side of the pixels a device crop ships, for memory checks: a decoded image's
    shorter side stays below twice `min_decoded_side` (`decode_rgb` reduces it otherwise), a box's
    longer side is at most 4/3 of its shorter one."""
    return math.ceil(4 / 3 * 2 * min_decoded_side(image_size))


def draw_box(image: Union[Image.Image, Header], image_size: int, tries: int = 10) -> Box:
    """A random crop of `image` (only its size is read: a header will do) from the distribution of RandomResizedCrop.get_params (its `tries`
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


def crop_clip(clip: list[Image.Image], image_size: int, train: bool) -> np.ndarray:
    """[T, 3, S, S] uint8: every frame of a video clip cropped by one box and resized to S × S, so
    that the crop adds no motion: in training a box drawn as an image's (`draw_box`) and resized
    as `crop_in_worker` does, otherwise the eval transform's resize and centre crop. Clips are
    always cropped in the worker (`data.resize_on` is an image setting)."""
    if train:
        box = draw_box(clip[0], image_size)
        crops = [crop_in_worker(frame, box, image_size) for frame in clip]  # each [S, S, 3]
    else:
        crops = [np.asarray(eval_crop(image_size)(frame)) for frame in clip]
    return np.stack(crops).transpose(0, 3, 1, 2)


def stack_crops(crops: list[np.ndarray]) -> Tensor:
    """[S, S, 3] uint8 arrays → [B, 3, S, S] uint8, each copied once into the batch."""
    batch = torch.empty((len(crops), 3, *crops[0].shape[:2]), dtype=torch.uint8)
    for slot, crop in zip(batch.numpy(), crops):  # the batch's memory
        slot[...] = crop.transpose(2, 0, 1)
    return batch


def box_pixels(image: Image.Image, box: Box) -> np.ndarray:
    """[h, w, 3] uint8: the pixels of `box`, which is all a device crop reads (a view of the
    decoded image). Shipping the box rather than the image keeps a padded batch small whatever
    the images' aspect ratios."""
    return np.asarray(image)[box.top : box.top + box.height, box.left : box.left + box.width]


class Window(NamedTuple):
    """The pixels an eval crop reads, and where in them the crop's window lies."""

    pixels: np.ndarray  # [h, w, 3] uint8: a view of the decoded image
    window: tuple[float, float, float, float]  # (top, left, height, width) in `pixels`, fractional


def centre_window(image: Image.Image, image_size: int) -> Window:
    """The eval transform (torchvision's Resize of the shorter side to S, then CenterCrop(S)) as a
    window of `image`, and the pixels around it that the resize reads (`centre_region`)."""
    (top, left, height, width), window = centre_region(image.size, image_size)
    return Window(np.asarray(image)[top : top + height, left : left + width], window)


def centre_region(size: tuple[int, int], image_size: int) -> tuple[Region, tuple[float, float, float, float]]:
    """For an image of `size` (width, height): the region the eval crop reads and the crop's window
    in it. Output pixel i of an axis resized from L to L' pixels and cropped at c samples the input
    at (i + c + 0.5) L / L', which is PIL's resize of the window starting at c L / L' and spanning
    S L / L'. Only the pixels the bicubic filter reaches from the window are in the region, so a
    panorama costs what a square image does."""
    width, height = size
    short, long = sorted((width, height))
    resized_long = int(image_size * long / short)  # torchvision's _compute_resized_output_size
    resized = (image_size, resized_long) if height <= width else (resized_long, image_size)  # (height, width)
    starts, lengths, window = [], [], []
    for length, resized_length in zip((height, width), resized):
        scale = length / resized_length
        start = int(round((resized_length - image_size) / 2.0)) * scale  # CenterCrop's offset, in input pixels
        support = 2 * max(scale, 1.0) + 1  # the cubic's reach, widened when downscaling, and a pixel to spare
        low, high = max(math.floor(start - support), 0), min(math.ceil(start + image_size * scale + support), length)
        starts.append(low)
        lengths.append(high - low)
        window.append((start - low, image_size * scale))
    (top, height_span), (left, width_span) = window
    return Region(starts[0], starts[1], lengths[0], lengths[1]), (top, left, height_span, width_span)


def uncropped_batch(images: list[np.ndarray], image_size: int,
                    windows: Optional[list[tuple[float, float, float, float]]] = None) -> Uncropped:
    """Images of different sizes in one [B, H, W, 3] uint8 tensor, each copied once; the padding
    is left as it is, since the resize gives it zero weight. Without `windows`, each image is
    resized whole (a training box)."""
    height, width = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    pixels = torch.empty((len(images), height, width, 3), dtype=torch.uint8)
    for slot, image in zip(pixels.numpy(), images):  # the tensor's memory
        slot[: image.shape[0], : image.shape[1]] = image
    sizes = torch.tensor([i.shape[:2] for i in images], dtype=torch.int64)  # [B, 2]
    if windows is None:
        windows = [(0.0, 0.0, float(h), float(w)) for h, w in sizes.tolist()]
    return Uncropped(pixels, sizes, torch.tensor(windows, dtype=torch.float32), image_size)


def crop_on_device(uncropped: Uncropped) -> Tensor:
    """[B, 3, S, S] uint8: every window resized to S × S on the device `uncropped` is on, as two
    batched matrix products (rows, then columns) with PIL's antialiased bicubic weights. Encoded
    images are decoded there first (`limoe.data.device_decode`)."""
    if uncropped.encoded is not None:
        regions, factors = decode_regions(uncropped.encoded, uncropped.sizes.device)
        sizes = torch.tensor([r.shape[:2] for r in regions], dtype=torch.int64, device=uncropped.sizes.device)
        reduced = uncropped.windows / uncropped.windows.new_tensor(factors)[:, None]  # [B, 4], in reduced pixels
        uncropped = uncropped._replace(pixels=padded(regions), sizes=sizes, windows=reduced)
    pixels = uncropped.pixels.permute(0, 3, 1, 2).float()  # [B, 3, H, W]
    size, windows = uncropped.output_size, uncropped.windows
    rows = _bicubic_weights(windows[:, 0], windows[:, 2], uncropped.sizes[:, 0], size, pixels.shape[2])  # [B, S, H]
    columns = _bicubic_weights(windows[:, 1], windows[:, 3], uncropped.sizes[:, 1], size, pixels.shape[3])  # [B, S, W]
    crops = rows[:, None] @ pixels @ columns.transpose(1, 2)[:, None]  # [B, 3, S, S]
    return crops.round_().clamp_(0, 255).to(torch.uint8)


def padded(regions: list[Tensor]) -> Tensor:
    """[h, w, 3] uint8 regions → [B, H, W, 3] uint8, each at the top left of its slot, on their device."""
    height, width = max(r.shape[0] for r in regions), max(r.shape[1] for r in regions)
    pixels = regions[0].new_zeros((len(regions), height, width, 3))
    for slot, region in zip(pixels, regions):
        slot[: region.shape[0], : region.shape[1]] = region
    return pixels


def encoded_batch(headers: list[Header], files: list[bytes], regions: list[Region],
                  windows: list[tuple[float, float, float, float]], image_size: int, min_side: int) -> Uncropped:
    """Encoded images (`decode_on="device"`) as an Uncropped with empty pixels: the device decodes
    the JPEGs it can (YCbCr or greyscale), the CPU the others (`limoe.data.device_decode`), and
    reduces those much larger than `min_side` as a worker would."""
    reasons = [cpu_decode_reason(header) for header in headers]
    full_sizes = [(header.size[1], header.size[0]) for header in headers]  # (height, width)
    encoded = Encoded(files, [not reason for reason in reasons], reasons, regions, full_sizes, min_side)
    sizes = torch.tensor([(r.height, r.width) for r in regions], dtype=torch.int64)  # [B, 2]
    return Uncropped(torch.empty((len(files), 0, 0, 3), dtype=torch.uint8), sizes,
                     torch.tensor(windows, dtype=torch.float32), image_size, encoded)


def eval_images_on(images: Union[Tensor, Uncropped], device: torch.device) -> Tensor:
    """[B, 3, S, S] float32 on `device`, normalised, as the model takes an eval batch's images:
    those the worker cropped are copied, uncropped ones are cropped and normalised there."""
    if isinstance(images, Uncropped):
        return normalize(crop_on_device(images.to(device)))
    return images.to(device, non_blocking=True)


def _bicubic_weights(starts: Tensor, spans: Tensor, lengths: Tensor, size: int, padded: int) -> Tensor:
    """[B, size, padded] float32: row i of image b weighs its input pixels j < lengths[b] as PIL's
    antialiased bicubic resize of the window [starts[b], starts[b] + spans[b]) to `size` pixels
    does (Keys' cubic with a = -0.5, stretched by the downscale factor, normalised to sum 1);
    pixels beyond the image weigh 0."""
    lengths = lengths.to(torch.float32)[:, None, None]  # [B, 1, 1]
    scale = spans.to(torch.float32)[:, None, None] / size
    stretch = scale.clamp(min=1.0)  # antialiasing: the filter widens when downscaling
    outputs = torch.arange(size, device=lengths.device, dtype=torch.float32)[:, None]  # [S, 1]
    centres = (outputs + 0.5) * scale + starts.to(torch.float32)[:, None, None]  # [B, S, 1]
    inputs = torch.arange(padded, device=lengths.device, dtype=torch.float32)  # [N]
    x = ((inputs + 0.5 - centres) / stretch).abs()  # [B, S, N]
    a = -0.5
    weights = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                          torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))
    weights = weights * (inputs < lengths)  # [B, S, N]: nothing from the padding
    return weights / weights.sum(dim=2, keepdim=True)
