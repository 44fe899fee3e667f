"""How many image-caption pairs (and audio-caption pairs) per CPU-second one data worker delivers:
open_clip's pipeline and limoe's.

Three pipelines run side by side in one process, on the same temporary shards of photo-like JPEGs
cropped to 224 px (the usual ViT input), each with one worker's work done in this process
(`workers 0`, one torch thread), so pairs per CPU-second of this process is the rate of one
worker on a core of its own, and robust to other load on the machine:

- open_clip: open_clip_train's `get_wds_dataset` with open_clip's `image_transform` and tokenizer.
  Its `tarfile_to_samples_nothrow` fails under webdataset 1.0 (`KeyError: 'fname'`), so it is
  replaced by webdataset's own `tarfile_to_samples`, which reads the same samples.
- limoe, worker resize: `train_loader` with `resize_on="worker"` (decode, crop and resize in PIL).
- limoe, device resize: `train_loader` with `resize_on="device"` (decode and draw the box only);
  the crop and resize that then happen on the device (`crop_on_device`) are timed per batch
  separately: on the GPU when there is one, else on this CPU with one thread.
- limoe, device decode: `decode_on="device"` as well (the worker reads the header and draws the
  box only); the device's time per batch is then the decode (nvJPEG on a GPU) and the resize.
- limoe, audio clips: `train_loader` with `modality="audio"` over the demo's audio shards
  (`data_shards/audio_train`, one-second 16 kHz FLAC): read, shuffle, decode, crop (resampled when
  `--audio-rate` differs from the shards' 16 kHz), tokenize, batch. The features (log-mel) are
  computed by the model on the device and are not in the row.

    python -m limoe.benchmarks.data [--samples 2048] [--batch-size 128] [--sizes 256 640] [--repeats 2]
                                    [--audio-shards data_shards/audio_train] [--audio-rate 16000] [--audio-seconds 1]

Reading the result: a GPU step that consumes B pairs in t seconds needs B / t pairs/s; divided by
the per-worker rate, that is the number of data workers (and CPU cores) it needs.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import os
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Optional

import open_clip
import torch
import webdataset as wds
from PIL import Image, ImageFilter

from limoe.config import ShardSource
from limoe.data.crops import crop_on_device
from limoe.data.audio import AUDIO_EXTENSIONS
from limoe.data.pipeline import expand_shards, train_loader
from limoe.data.tar_members import shard_samples
from limoe.data.preprocess import MEAN, STD
from limoe.training.device_batches import to_device

COLOURS = ("red", "green", "blue", "amber", "grey", "violet", "teal", "ochre")
AUDIO_SHARDS = Path(__file__).resolve().parents[2] / "data_shards" / "audio_train"  # in a checkout of the repository
IMAGE_SIZE = 224
CONTEXT_LENGTH = 77  # open_clip's ViT-B tokenizer


def photo_like_jpeg(rng: random.Random, size: int = 256) -> bytes:
    """Random smooth colour fields plus grain: JPEG sizes near real photos' (pure noise would
    make every file several times larger than a photo of the same size)."""
    coarse = Image.new("RGB", (8, 8))
    coarse.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(64)])
    image = coarse.resize((size, size), Image.Resampling.BICUBIC)
    grain = Image.effect_noise((size, size), 24).convert("RGB").filter(ImageFilter.GaussianBlur(0.6))
    image = Image.blend(image, grain, 0.15)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_photo_shard(path: Path, size: int = 256, count: int = 512) -> float:
    """A shard of `count` `size` px JPEGs with short captions; returns the mean JPEG size in kB."""
    rng = random.Random(0)
    total = 0
    with wds.TarWriter(str(path)) as writer:
        for index in range(count):
            jpeg = photo_like_jpeg(rng, size)
            total += len(jpeg)
            caption = f"a photo of a {rng.choice(COLOURS)} and {rng.choice(COLOURS)} texture number {index}"
            writer.write({"__key__": f"{index:09d}", "jpg": jpeg, "txt": caption})
    return total / count / 1000


def open_clip_batches(shard: str, batch_size: int, samples: int) -> Iterable:
    """open_clip_train's training loader over `shard`, one worker's work in this process, or None
    when open_clip_train cannot be imported (it needs pandas, which limoe does not)."""
    try:
        from open_clip_train import data as open_clip_data
    except ImportError:
        return None
    open_clip_data.tarfile_to_samples_nothrow = wds.tarfile_to_samples(handler=wds.warn_and_continue)
    args = SimpleNamespace(train_data=shard, train_num_samples=samples + 2 * batch_size, dataset_resampled=True,
                           train_data_upsampling_factors=None, seed=0, batch_size=batch_size, workers=0, world_size=1)
    preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=True, mean=MEAN, std=STD)
    info = open_clip_data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    return info.dataloader


def limoe_batches(shard: str, batch_size: int, resize_on: str, decode_on: str = "worker") -> Iterable:
    return train_loader((ShardSource(shard),), batch_size, IMAGE_SIZE, CONTEXT_LENGTH, 0, shuffle_buffer=1000,
                        resampled=True, seed=0, max_bad_fraction=0.01, resize_on=resize_on, decode_on=decode_on)


def audio_batches(shards: str, batch_size: int, rate: int, seconds: float) -> Iterable:
    return train_loader((ShardSource(shards),), batch_size, IMAGE_SIZE, CONTEXT_LENGTH, 0, shuffle_buffer=1000,
                        resampled=True, seed=0, max_bad_fraction=0.01, modality="audio", sample_rate=rate,
                        clip_seconds=seconds)


def mean_audio_kilobytes(shards: str) -> float:
    """The mean size of the audio members of `shards`, in kB."""
    sizes = [len(data) for shard in expand_shards(shards) for sample in shard_samples(shard)
             for extension, data in sample.items() if extension in AUDIO_EXTENSIONS]
    return sum(sizes) / len(sizes) / 1000


def pairs_per_cpu_second(make_batches: Callable[[], Iterable], samples: int, batch_size: int) -> float:
    """Steady state: the first batch (start-up, filling the shuffle buffer) is not timed."""
    batches = iter(make_batches())
    next(batches)
    cpu = time.process_time()
    count = sum(len(batch[1]) for batch in itertools.islice(batches, samples // batch_size))
    return count / (time.process_time() - cpu)


def device_crop_ms(shard: str, batch_size: int, device: torch.device, decode_on: str, repeats: int = 5) -> float:
    """Milliseconds `crop_on_device` (with `decode_on="device"`, decoding included) takes per batch
    on `device` (best of `repeats`), the batch already there: GPU time between CUDA events, or
    process CPU time on a CPU."""
    uncropped = to_device(next(iter(limoe_batches(shard, batch_size, "device", decode_on))).images, device)
    crop_on_device(uncropped)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            crop_on_device(uncropped)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            cpu = time.process_time()
            crop_on_device(uncropped)
            times.append(1000 * (time.process_time() - cpu))
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048, help="pairs timed per measurement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 640], help="stored JPEG sides, in px")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per row; the best is shown")
    parser.add_argument("--audio-shards", default=str(AUDIO_SHARDS), help="audio shards for the audio row")
    parser.add_argument("--audio-rate", type=int, default=16_000, help="Hz of the clips batched")
    parser.add_argument("--audio-seconds", type=float, default=1.0, help="length of the clips batched")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, device crop on {device}; "
          f"batch {args.batch_size}, {args.samples} timed pairs, best of {args.repeats}")
    print(f"| {'stored JPEG -> 224 px':<24} | {'pipeline':<26} | pairs per CPU-second | vs open_clip | device ms/batch |")
    print(f"|{'-' * 26}|{'-' * 28}|---------------------:|------------:|----------------:|")
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            shard = str(Path(scratch) / f"{size}.tar")
            kilobytes = write_photo_shard(Path(shard), size)
            pipelines: list[tuple[str, Callable[[], Optional[Iterable]]]] = [
                ("open_clip get_wds_dataset", lambda: open_clip_batches(shard, args.batch_size, args.samples)),
                ("limoe, worker resize", lambda: limoe_batches(shard, args.batch_size, "worker")),
                ("limoe, device resize", lambda: limoe_batches(shard, args.batch_size, "device")),
                ("limoe, device decode", lambda: limoe_batches(shard, args.batch_size, "device", "device")),
            ]
            baseline = None
            for name, make in pipelines:
                if make() is None:
                    print(f"| {f'{size} px (~{kilobytes:.0f} kB)':<24} | {name:<26} | not measured: open_clip_train "
                          f"needs pandas (pip install pandas) |", flush=True)
                    continue
                rate = max(pairs_per_cpu_second(make, args.samples, args.batch_size) for _ in range(args.repeats))
                baseline = baseline or (rate if name.startswith("open_clip") else None)
                ratio = f"{rate / baseline:.2f}x" if baseline else "-"
                on_device = {"limoe, device resize": "worker", "limoe, device decode": "device"}
                decode_on = on_device.get(name)
                crop = f"{device_crop_ms(shard, args.batch_size, device, decode_on):.1f}" if decode_on else "-"
                print(f"| {f'{size} px (~{kilobytes:.0f} kB)':<24} | {name:<26} | {rate:>20.0f} | {ratio:>11} "
                      f"| {crop:>15} |", flush=True)
    clip = f"{args.audio_rate / 1000:g} kHz {args.audio_seconds:g} s clip"
    if not Path(args.audio_shards).exists():
        print(f"| {clip:<24} | {'limoe, audio clips':<26} | not measured: no shards at {args.audio_shards} |")
        return
    make = functools.partial(audio_batches, args.audio_shards, args.batch_size, args.audio_rate, args.audio_seconds)
    rate = max(pairs_per_cpu_second(make, args.samples, args.batch_size) for _ in range(args.repeats))
    print(f"| {f'{clip} (~{mean_audio_kilobytes(args.audio_shards):.0f} kB)':<24} | {'limoe, audio clips':<26} "
          f"| {rate:>20.0f} | {'-':>11} | {'-':>15} |", flush=True)
    print("(audio: decode, crop and resampling where needed; the log-mel features are computed on the device and "
          "are not in the row)")


if __name__ == "__main__":
    main()
