"""Images decoded on the device (`data.decode_on: device`) against images decoded in the worker, and
the CPU fallback for what the device decoder cannot read: counted, logged, and the same pixels."""

import io
import itertools
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from limoe.config import ShardSource
from limoe.data import device_decode
from limoe.data.crops import eval_images_on
from limoe.data.pipeline import eval_loader, train_loader
from limoe.data.preprocess import eval_crop, normalize, unnormalize
from limoe.errors import LimoeError
from limoe.training.device_batches import DeviceBatches
from tests.data.test_crops import CROP, _differences, _photo

# Odd sizes, a 17:1 panorama both ways; shorter sides under twice what a 31 px crop needs (31 px for
# evaluation, 38 for training), so that the worker decodes them at full scale, as the device does
SIZES = [(61, 47), (59, 50), (50, 50), (300, 17), (17, 300), (40, 33), (61, 61)]


def _encoded(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **{"format": "JPEG", "quality": 90, **options})
    return buffer.getvalue()


@pytest.mark.parametrize("options", [{}, {"subsampling": 0}, {"subsampling": 1, "quality": 75}, {"progressive": True}])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_torchvisions_cpu_jpeg_decoder_gives_pils_pixels_bit_for_bit(options, mode):
    """Both are libjpeg-turbo with the same settings: no tolerance is needed on the CPU."""
    for seed, size in enumerate(SIZES):
        file = _encoded(_photo(size, seed).convert(mode), **options)
        ours = decode_jpeg(torch.frombuffer(bytearray(file), dtype=torch.uint8), mode=ImageReadMode.RGB)  # [3, H, W]
        theirs = np.asarray(Image.open(io.BytesIO(file)).convert("RGB"))  # [H, W, 3]
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), theirs), (size, mode, options)


@pytest.fixture
def fallbacks(monkeypatch):
    """A fresh count of CPU fallbacks for the test."""
    monkeypatch.setattr(device_decode.FALLBACKS, "counts", {})
    return device_decode.FALLBACKS


def _shard(folder, files: list[bytes], name: str = "00000.tar") -> str:
    shard = str(folder / name)
    with wds.TarWriter(shard) as writer:
        for index, file in enumerate(files):
            extension = "png" if file.startswith(b"\x89PNG") else "jpg"
            writer.write({"__key__": f"{index:04d}", extension: file, "txt": f"photo {index}"})
    return shard


def _train_batches(shard: str, decode_on: str) -> list:
    torch.manual_seed(7)
    loader = train_loader((ShardSource(shard),), 4, CROP, 16, 0, 1, False, 0, 0.0, resize_on="device",
                          decode_on=decode_on)
    return list(itertools.islice(DeviceBatches(loader, torch.device("cpu")), 2))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_training_crops_decoded_on_the_device_are_the_workers_bit_for_bit(tmp_path, fallbacks):
    """The same seed draws the same boxes from the header's size as from the decoded image's; the
    decoders agree bit for bit, so the crops do too (images small enough not to be decoded at a
    reduced scale). A PNG goes to the CPU and is counted."""
    files = [_encoded(_photo(size, seed)) for seed, size in enumerate(SIZES)] + [_png(_photo((45, 52), 9))]
    shard = _shard(tmp_path, files)  # 8 files, two batches of 4
    for worker, device in zip(_train_batches(shard, "worker"), _train_batches(shard, "device")):
        assert torch.equal(worker.images, device.images) and torch.equal(worker.tokens, device.tokens)
    assert fallbacks.counts == {"png": 1}  # in the first two batches of 4


def test_eval_crops_decoded_on_the_device_are_the_workers_bit_for_bit(tmp_path, fallbacks):
    shard = _shard(tmp_path, [_encoded(_photo(size, seed)) for seed, size in enumerate(SIZES)])
    worker = list(eval_loader(shard, 3, CROP, 16, 0, resize_on="device"))
    device = list(eval_loader(shard, 3, CROP, 16, 0, resize_on="device", decode_on="device"))
    assert [b.keys for b in worker] == [b.keys for b in device]
    for a, b in zip(worker, device):
        assert torch.equal(eval_images_on(a.images, torch.device("cpu")), eval_images_on(b.images, torch.device("cpu")))
    assert fallbacks.total == 0


def test_what_the_device_cannot_decode_is_decoded_on_the_cpu_counted_and_logged(tmp_path, fallbacks, monkeypatch,
                                                                               caplog):
    """A CMYK JPEG and a PNG never reach the device decoder; a JPEG it refuses (here: the decoder
    raises for the one file of 61 x 61) is retried alone and then decoded on the CPU; a JPEG whose
    body is cut short, so that neither decoder reads it, trains as a grey image and is counted."""
    refused = _encoded(_photo((61, 61), 3))
    device_decoder = device_decode.decode_jpeg

    def refusing(files, **options):
        if any(bytes(file.numpy()) == refused for file in files):
            raise RuntimeError("nvjpeg: unsupported")
        return device_decoder(files, **options)

    monkeypatch.setattr(device_decode, "decode_jpeg", refusing)
    cut = _encoded(_photo((60, 44), 4))
    files = [_encoded(_photo((61, 47), 0)), _encoded(_photo((59, 50), 1).convert("CMYK")), refused,
             _png(_photo((50, 50), 2)), cut[: len(cut) // 2]]
    shard = _shard(tmp_path, files)
    with caplog.at_level(logging.WARNING, logger="limoe.data.device_decode"):
        loader = eval_loader(shard, 5, CROP, 16, 0, resize_on="device", decode_on="device", max_bad_fraction=1.0)
        (batch,) = list(loader)
        images = eval_images_on(batch.images, torch.device("cpu"))  # [5, 3, 31, 31]
    assert fallbacks.counts == {"cmyk": 1, "device_decode_failed": 1, "png": 1, "bad_image": 1}
    assert "4 images decoded on the CPU instead of the device" in caplog.text  # logged at 1, 2 and 4
    assert "decoded on the CPU instead of the device (bad_image 1, cmyk 1" in loader.bad_samples.summary()
    (reference,) = list(eval_loader(shard, 5, CROP, 16, 0, resize_on="device", max_bad_fraction=1.0))
    assert reference.keys == batch.keys[:4]  # the worker skips the cut file as a bad sample
    assert torch.equal(images[:4], eval_images_on(reference.images, torch.device("cpu")))
    grey = torch.full((1, 3, CROP, CROP), device_decode.GREY, dtype=torch.uint8)
    assert torch.allclose(images[4:], normalize(grey))


def test_image_bounds_are_checked_from_the_header_in_the_worker(tmp_path, fallbacks):
    """A 60000 x 1 sliver is skipped before anything is decoded, as with decode_on worker."""
    sliver = _png(Image.new("L", (60_000, 1)))
    shard = _shard(tmp_path, [_encoded(_photo((61, 47), 0)), sliver])
    loader = eval_loader(shard, 4, CROP, 16, 0, resize_on="device", decode_on="device", max_bad_fraction=1.0)
    assert [key for batch in loader for key in batch.keys] == ["0000"]
    assert loader.bad_samples.bad == {"image_aspect_ratio": 1} and fallbacks.total == 0


def test_decoding_on_the_device_needs_the_resize_there_too(tmp_path):
    shard = _shard(tmp_path, [_encoded(_photo((61, 47), 0))])
    with pytest.raises(LimoeError, match="set data.resize_on: device too"):
        eval_loader(shard, 4, CROP, 16, 0, decode_on="device")


def test_large_images_decoded_on_the_device_are_reduced_as_a_worker_reduces_them(tmp_path, fallbacks):
    """Photos 2 to 15 times the crop's side: each region is shrunk by the integer factor a worker
    would use (shorter side // 31) before the resize, so the padded pixels stay small, and the crops
    are the eval transform of the full-size photo within 2 grey levels, 0.5 on average (measured:
    at most 2, 0.25-0.37 on average). The worker's own reduced-scale decode shifts the centre crop
    by its rounding of the reduced size, so it is not the reference here."""
    sizes = [(200, 150), (640, 480), (333, 251), (1000, 90), (129, 71), (124, 93)]
    photos = [_photo(size, seed) for seed, size in enumerate(sizes)]
    shard = _shard(tmp_path, [_encoded(photo, quality=95) for photo in photos])
    (batch,) = list(eval_loader(shard, 6, CROP, 16, 0, resize_on="device", decode_on="device"))
    crops = (unnormalize(eval_images_on(batch.images, torch.device("cpu"))) * 255).round()  # [6, 3, 31, 31]
    for photo, crop in zip(photos, crops):
        decoded = Image.open(io.BytesIO(_encoded(photo, quality=95))).convert("RGB")
        expected = np.asarray(eval_crop(CROP)(decoded)).transpose(2, 0, 1)
        mean, largest = _differences(crop.numpy(), expected)
        assert mean <= 0.5 and largest <= 2, (photo.size, mean, largest)
    regions, factors = device_decode.decode_regions(batch.images.encoded, torch.device("cpu"))
    assert factors == [150 // 31, 480 // 31, 251 // 31, 90 // 31, 71 // 31, 93 // 31]
    assert max(max(region.shape[:2]) for region in regions) < 4 * CROP  # not the 480 px of the full photo


def test_decode_groups_keep_each_group_within_the_budget_and_an_oversized_image_alone():
    assert device_decode.decode_groups([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert device_decode.decode_groups([3, 12, 4, 4, 3], 10) == [[0], [1], [2, 3], [4]]
    assert device_decode.decode_groups([], 10) == []


def test_a_batch_decoded_in_budgeted_groups_gives_the_one_call_regions(tmp_path, fallbacks):
    """The device is handed no more full-size bytes per call than the budget (here the largest
    photo's), and the regions, factors and fallbacks are those of decoding the batch in one call."""
    sizes = [(200, 150), (640, 480), (333, 251), (1000, 90), (129, 71), (124, 93)]
    files = [_encoded(_photo(size, seed), quality=95) for seed, size in enumerate(sizes)]
    files.insert(2, _png(_photo((60, 45), 9)))  # decoded on the CPU, outside the groups
    shard = _shard(tmp_path, files)
    (batch,) = list(eval_loader(shard, 7, CROP, 16, 0, resize_on="device", decode_on="device"))
    encoded, cpu = batch.images.encoded, torch.device("cpu")
    calls = []

    def recording_decoder(group, device):
        calls.append(sum(3 * h * w for h, w in (decode_jpeg(file).shape[1:] for file in group)))
        return device_decode.device_jpeg_decoder(group, device)

    whole = device_decode.decode_regions(encoded, cpu, budget=2**40)
    budget = 3 * 640 * 480
    grouped = device_decode.decode_regions(encoded, cpu, decoder=recording_decoder, budget=budget)
    assert len(calls) == 3 and max(calls) <= budget  # [200 px], [640 px], the other four
    assert grouped[1] == whole[1]
    assert all(torch.equal(a, b) for a, b in zip(grouped[0], whole[0]))
    assert fallbacks.counts == {"png": 2}
