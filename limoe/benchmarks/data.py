"""How many image-caption pairs per second the training input pipeline delivers on CPU.

Measures `limoe.data.pipeline.train_loader` end to end (read shards, shuffle, decode, random crop and
normalise, tokenize, batch) on the shipped 64 px demo shards and on a temporary shard of 256 px
JPEGs cropped to 224 px, the usual ViT input. Reading the result: a GPU step that consumes B
pairs in t seconds needs B / t pairs/s; divided by the per-worker rate, that is the number of
data workers (and CPU cores) it needs.

    python -m limoe.benchmarks.data [--samples 2048] [--workers 0 2]

`workers 0` runs the pipeline in the main process, i.e. exactly one worker's work; like a
DataLoader worker it then uses one torch thread (several intra-op threads only add overhead on
these small tensors, and on a busy machine make it many times slower). Its pairs per
CPU-second is the per-worker rate on a core of its own, and is robust to other load.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import random
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image, ImageFilter

from limoe.config import ShardSource
from limoe.data.pipeline import train_loader

DEMO = Path(__file__).resolve().parent.parent / "data_shards" / "train"
COLOURS = ("red", "green", "blue", "amber", "grey", "violet", "teal", "ochre")


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


def write_photo_shard(path: Path, count: int = 512) -> float:
    """A shard of `count` 256 px JPEGs with short captions; returns the mean JPEG size in kB."""
    rng = random.Random(0)
    total = 0
    with wds.TarWriter(str(path)) as writer:
        for index in range(count):
            jpeg = photo_like_jpeg(rng)
            total += len(jpeg)
            caption = f"a photo of a {rng.choice(COLOURS)} and {rng.choice(COLOURS)} texture number {index}"
            writer.write({"__key__": f"{index:09d}", "jpg": jpeg, "txt": caption})
    return total / count / 1000


def measure(spec: str, image_size: int, workers: int, samples: int, batch_size: int) -> tuple[float, float]:
    """Steady-state (pairs per wall-clock second, pairs per CPU-second of this process); the
    first batch from each worker (start-up) is not timed. CPU time only means something with
    workers=0, when this process does all the work; it is what one worker achieves on a core of
    its own, whatever else the machine is running."""
    loader = train_loader((ShardSource(spec),), batch_size, image_size, 16, workers, shuffle_buffer=1000,
                          resampled=True, seed=0, max_bad_fraction=0.01)
    batches = iter(loader)
    for _ in range(max(workers, 1)):
        next(batches)
    wall, cpu = time.perf_counter(), time.process_time()
    count = sum(len(batch.tokens) for batch in itertools.islice(batches, samples // batch_size))
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048, help="pairs timed per measurement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        shard = Path(scratch) / "00000.tar"
        kilobytes = write_photo_shard(shard)
        cases = [("demo shards, 64 px JPEG (~1.8 kB)", str(DEMO), 64),
                 (f"256 px JPEG (~{kilobytes:.0f} kB) -> 224", str(shard), 224)]
        print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
        print(f"| {'data':<34} | workers | pairs/s (wall) | pairs per CPU-second |")
        print(f"|{'-' * 36}|--------:|---------------:|---------------------:|")
        for name, spec, size in cases:
            for workers in args.workers:
                wall, cpu = measure(spec, size, workers, args.samples, args.batch_size)
                per_cpu = f"{cpu:.0f}" if workers == 0 else "-"
                print(f"| {name:<34} | {workers:>7} | {wall:>14.0f} | {per_cpu:>20} |", flush=True)

if __name__ == "__main__":
    main()
