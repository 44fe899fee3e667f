"""Crops resized on the device against the same crops resized in the worker, image by image: the
training's random boxes, and evaluation's resize of the shorter side and centre crop."""

import io
import itertools

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageFilter
from torchvision.transforms import RandomResizedCrop

from limoe.config import ShardSource
from limoe.data.crops import (
    box_pixels, centre_window, crop_in_worker, crop_on_device, draw_box, eval_images_on, min_decoded_side,
    uncropped_batch,
)
from limoe.data.images import decode_rgb
from limoe.data.pipeline import eval_loader, train_loader
from limoe.data.preprocess import eval_crop, unnormalize
from limoe.training.device_batches import DeviceBatches

SIZES = [(61, 47), (83, 90), (50, 50), (129, 71), (40, 33)]  # odd, landscape and portrait, up to 4x the crop
CROP = 31
# The same filter, PIL's in 8-bit fixed point with a rounded intermediate, the device's in float32.
MEAN_LEVELS = 0.25  # most mean absolute difference per image, in grey levels of 255 (measured: 0.12-0.18)
MAX_LEVELS = 1  # most difference of any pixel (a rounding apart)


def _photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour fields with a little grain, as photos are (pure noise has no content to keep)."""
    generator = np.random.default_rng(seed)
    coarse = Image.fromarray(generator.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    image = coarse.resize(size, Image.Resampling.BICUBIC)
    grain = Image.effect_noise(size, 20).convert("RGB").filter(ImageFilter.GaussianBlur(0.6))
    return Image.blend(image, grain, 0.1)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _differences(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean, largest) absolute difference of two uint8 images, in grey levels."""
    difference = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(difference.mean()), float(difference.max())


def test_device_crops_match_worker_crops_of_the_same_boxes_image_by_image():
    photos = [_photo(size, seed) for seed, size in enumerate(SIZES)]
    torch.manual_seed(0)
    boxes = [draw_box(photo, CROP) for photo in photos]
    on_device = crop_on_device(uncropped_batch([box_pixels(p, b) for p, b in zip(photos, boxes)], CROP))  # [5, 3, 31, 31]
    assert on_device.shape == (len(SIZES), 3, CROP, CROP) and on_device.dtype == torch.uint8
    for photo, box, crop in zip(photos, boxes, on_device):
        expected = crop_in_worker(photo, box, CROP)  # [31, 31, 3]
        mean, largest = _differences(crop.permute(1, 2, 0).numpy(), expected)
        assert mean <= MEAN_LEVELS and largest <= MAX_LEVELS, (photo.size, box, mean, largest)
        # the tolerance tells boxes apart: the same crop two pixels to the right is well outside it
        shifted = crop_in_worker(photo, box._replace(left=box.left + 2), CROP)
        assert _differences(crop.permute(1, 2, 0).numpy(), shifted)[0] > 10 * MEAN_LEVELS


def test_padding_a_box_to_the_batch_size_does_not_change_its_crop():
    """A small box among larger ones reads its own pixels only, whatever the padding holds."""
    small, large = np.asarray(_photo((23, 19), 1)), np.asarray(_photo((70, 64), 2))
    alone = crop_on_device(uncropped_batch([small], 13))
    batch = uncropped_batch([small, large], 13)
    batch.pixels[0, 19:] = 255  # the padding below and beside the small box
    batch.pixels[0, :, 23:] = 0
    assert torch.equal(crop_on_device(batch)[0], alone[0])


# odd sizes; portrait and landscape; enlarged (17 px to 31) and reduced; a 17:1 panorama whose centre
# window is cut out of a wide image, so only the pixels around it are shipped
EVAL_SIZES = [(61, 47), (83, 90), (50, 50), (129, 71), (40, 33), (300, 17), (17, 300), (241, 998)]


def _centre_crops_on_device(photos: list[Image.Image], size: int) -> torch.Tensor:
    windows = [centre_window(photo, size) for photo in photos]
    return crop_on_device(uncropped_batch([w.pixels for w in windows], size, [w.window for w in windows]))


def test_device_centre_crops_match_the_eval_transform_image_by_image():
    """The same tolerance as the training crops (measured: 0.12-0.20 levels on average, at most 1):
    PIL resizes the whole image and the transform crops it, the device resizes the crop's window."""
    photos = [_photo(size, seed) for seed, size in enumerate(EVAL_SIZES)]
    on_device = _centre_crops_on_device(photos, CROP)  # [8, 3, 31, 31]
    assert on_device.shape == (len(EVAL_SIZES), 3, CROP, CROP)
    for photo, crop in zip(photos, on_device):
        expected = np.asarray(eval_crop(CROP)(photo))  # [31, 31, 3]
        mean, largest = _differences(crop.permute(1, 2, 0).numpy(), expected)
        assert mean <= MEAN_LEVELS and largest <= MAX_LEVELS, (photo.size, mean, largest)
        # a window one output pixel off centre is well outside the tolerance
        shift = -(-min(photo.size) // CROP)
        off_centre = np.asarray(eval_crop(CROP)(photo.crop((shift, shift, *photo.size))))
        assert _differences(crop.permute(1, 2, 0).numpy(), off_centre)[0] > 4 * MEAN_LEVELS, photo.size


def test_a_panorama_ships_only_the_pixels_around_its_centre_crop():
    """998 x 241 to a 31 px crop, by hand: the width resizes to int(31 x 998 / 241) = 128 px, each
    7.796875 input pixels; CenterCrop starts at round(97 / 2) = 48, input pixel 374.25, and spans
    31 x 7.796875 = 241.703 px. The cubic reaches 2 x 7.796875 px further, plus one to spare: 16.59 px,
    so columns floor(357.66) = 357 to ceil(632.55) = 633 are shipped, the window at 374.25 - 357."""
    window = centre_window(_photo((998, 241), 0), CROP)
    assert window.pixels.shape == (241, 633 - 357, 3)
    assert window.window == pytest.approx((0, 17.25, 241, 241.703125))


def test_the_eval_loader_gives_the_same_images_with_either_resize(tmp_path):
    """The same samples and keys; the device's crops, normalised there, within the tolerance."""
    shard = tmp_path / "00000.tar"
    with wds.TarWriter(str(shard)) as writer:
        for index, size in enumerate(EVAL_SIZES):
            writer.write({"__key__": f"{index:04d}", "jpg": _jpeg(_photo(size, index)), "txt": f"photo {index}"})
    worker = list(eval_loader(str(shard), 3, CROP, 16, 0))
    device = list(eval_loader(str(shard), 3, CROP, 16, 0, resize_on="device"))
    assert [b.keys for b in worker] == [b.keys for b in device] and len(worker) == 3  # 3 + 3 + 2
    for a, b in zip(worker, device):
        assert torch.equal(a.tokens, b.tokens)
        images = eval_images_on(b.images, torch.device("cpu"))  # [B, 3, 31, 31] float32, normalised
        assert images.shape == a.images.shape and images.dtype == torch.float32
        for x, y in zip(a.images, images):  # back to grey levels
            mean, largest = _differences((unnormalize(x[None])[0] * 255).round().numpy(),
                                         (unnormalize(y[None])[0] * 255).round().numpy())
            assert mean <= MEAN_LEVELS and largest <= MAX_LEVELS


def _photo_shard(folder) -> str:
    shard = str(folder / "00000.tar")
    with wds.TarWriter(shard) as writer:
        for index, size in enumerate(SIZES * 2):
            writer.write({"__key__": f"{index:04d}", "jpg": _jpeg(_photo(size, index)), "txt": f"photo {index}"})
    return shard


def _batches(shard: str, resize_on: str, device: str) -> list:
    """The first two training batches as a step gets them, from the same seed."""
    torch.manual_seed(7)
    loader = train_loader((ShardSource(shard),), 4, CROP, 16, 0, 1, False, 0, 0.0, resize_on=resize_on)
    return list(itertools.islice(DeviceBatches(loader, torch.device(device)), 2))


def test_the_loader_gives_the_same_images_with_either_resize(tmp_path):
    """The same seed draws the same boxes; the main process crops them when resize_on is device."""
    shard = _photo_shard(tmp_path)
    for worker, device in zip(_batches(shard, "worker", "cpu"), _batches(shard, "device", "cpu")):
        assert torch.equal(worker.tokens, device.tokens)
        assert device.images.shape == worker.images.shape == (4, 3, CROP, CROP)
        for a, b in zip(worker.images, device.images):
            mean, largest = _differences(a.numpy(), b.numpy())
            assert mean <= MEAN_LEVELS and largest <= MAX_LEVELS


@pytest.mark.parametrize("fmt, decoded", [("JPEG", (200, 150)), ("PNG", (134, 100))])
def test_a_large_image_is_decoded_at_a_reduced_scale(fmt, decoded):
    """800 x 600 for a shorter side of 100: a JPEG by its DCT (1/4, the largest power of two that
    keeps 100), any other format by an integer box filter (1/6, rounding up); the pixels are the image's."""
    photo = _photo((800, 600), 3)
    buffer = io.BytesIO()
    photo.save(buffer, format=fmt, quality=95)
    reduced = decode_rgb(io.BytesIO(buffer.getvalue()), min_side=100)
    assert reduced.size == decoded
    expected = np.asarray(photo.resize(decoded, Image.Resampling.BOX))
    assert _differences(np.asarray(reduced), expected)[0] < 1.5  # grey levels on average (measured: 0.5, 0.8)
    assert decode_rgb(io.BytesIO(buffer.getvalue()), min_side=301).size == (800, 600)  # less than 2x: kept


@pytest.mark.parametrize("size", [(101, 77), (77, 101), (30, 200)])  # (77, 101): about a third fall back
def test_boxes_come_from_torchvisions_random_resized_crop_distribution(size):
    """Two-sample Kolmogorov-Smirnov distance between 3,000 boxes each way, per coordinate: below
    0.05 (the 0.1% critical value is 1.95 * sqrt(2 / 3000) = 0.050)."""
    image, crop = Image.new("RGB", size), RandomResizedCrop(CROP, scale=(0.9, 1.0))
    torch.manual_seed(1)
    ours = torch.tensor([draw_box(image, CROP) for _ in range(3000)], dtype=torch.float64)  # [N, 4]
    torch.manual_seed(2)
    theirs = torch.tensor([crop.get_params(image, crop.scale, crop.ratio) for _ in range(3000)], dtype=torch.float64)
    for a, b in zip(ours.T, theirs.T):
        values = torch.cat([a, b]).unique()  # [V]
        cdf_a = (a[:, None] <= values).double().mean(0)
        cdf_b = (b[:, None] <= values).double().mean(0)
        assert (cdf_a - cdf_b).abs().max() < 0.05


def test_the_smallest_random_crop_of_a_reduced_image_keeps_the_crop_resolution():
    """Scale 0.9 of the area at aspect 3/4 spans sqrt(0.9 * 3/4) of the side: 224 / 0.8216 = 272.6."""
    assert min_decoded_side(224) == 273


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_batches_crop_on_the_gpu_as_on_the_cpu(tmp_path):
    """The copy ahead on a side stream, then the crop on the compute stream: the CPU's crops, to
    float rounding (at most one grey level)."""
    shard = _photo_shard(tmp_path)
    for cpu, gpu in zip(_batches(shard, "device", "cpu"), _batches(shard, "device", "cuda")):
        assert gpu.images.is_cuda and gpu.images.dtype == torch.uint8
        assert (gpu.images.cpu().int() - cpu.images.int()).abs().max() <= 1
        assert torch.equal(gpu.tokens.cpu(), cpu.tokens)
