"""Input pipelines: webdataset shards to batches of images or audio clips and caption tokens.

Each DataLoader worker runs the whole pipeline on its own share of the shards: read tar files,
group members into samples, shuffle in memory (training), decode, crop, tokenize and batch.
Batches cross the process boundary whole, which keeps per-sample Python overhead inside workers.
Training crops are resized in the worker or, with `resize_on="device"`, on the device after the
batch is copied there (`limoe.data.crops`); images are decoded at a reduced scale when they are
much larger than the crop needs (`limoe.data.images`).

Audio shards (`modality="audio"`, LAION-CLAP's layout: `KEY.flac` and a `KEY.json` whose `"text"`
lists captions) go through the same stream: each clip is decoded at the model's rate and length in
the worker (`limoe.data.audio.decode_clip`: a random window in training, the centre one in
evaluation) and batched as float32 waveforms; the model computes the features on the device.

Video shards (`modality="video"`: `KEY.mp4`, `KEY.webm`, or a filmstrip `KEY.png` / `KEY.jpg`, with
captions as audio's) are decoded in the worker to `frames` frames `frame_stride` source frames
apart (`limoe.data.video`: a random window and one random crop box for all frames in training, the
centre window and the eval crop in evaluation) and batched as uint8 [B, T, 3, S, S], normalised
where images are.

Training (`train_loader`) is an endless stream of image-caption pairs, or of labelled images
for a classification task: shards are either resampled with replacement
(each rank and worker drawing with its own seed, LAION-style) or shuffled every epoch and split
between ranks and workers. Several sources are mixed per sample (`limoe.data.sources` says in what
proportions: by size unless the config gives weights, as open_clip does). Evaluation
(`eval_loader`) reads every sample exactly once across ranks and workers, in shard order.

Bad data is skipped and counted, never fatal by itself and never silent: a corrupt image or clip, a
sample without a usable image or clip, caption or label, or a shard that cannot be read to the end. Each
worker keeps a `WorkerTally` that travels with every batch, so the main process's
`BadSampleCounter` (`loader.bad_samples`) knows counts from all workers; warnings are logged as
the count doubles, and once the bad fraction of any worker passes `max_bad_fraction` the loader
raises LimoeError naming the offending shard and key.

Randomness is seeded: shard order, mixing and shuffling use per-rank, per-worker
`random.Random` instances derived from `seed`, and the DataLoader's generator seeds torch (for
the random image and video crops) in each worker. With `workers=0` those crops draw from the main
process's torch generator, which the trainer seeds. Audio and video windows and the caption drawn
from a sample's list come from a `random.Random` of their own per rank and worker, whatever the
worker count.
"""

from __future__ import annotations

import functools
import glob
import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, NamedTuple, Optional, Union

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from limoe.config import ModelConfig, ShardSource
from limoe.distributed import rank_and_world
from limoe.errors import LimoeError
from limoe.data.crops import (
    Uncropped, Window, box_pixels, centre_region, centre_window, crop_clip, crop_in_worker, draw_box, encoded_batch,
    largest_box_side, min_decoded_side, stack_crops, uncropped_batch,
)
from limoe.data.device_decode import FALLBACKS, Region
from limoe.data.preprocess import eval_crop, normalize, tokenizer
from limoe.files import read_text_file
from limoe.data.audio import AUDIO_EXTENSIONS, UnusableAudio, decode_clip
from limoe.data.images import Header, UnusableImage, decode_rgb, read_header
from limoe.data.video import (
    VIDEO_EXTENSIONS, VIDEO_FILE_EXTENSIONS, UnusableVideo, decode_frames, require_pyav,
)
from limoe.data.sources import mixing_weights
from limoe.data.tar_members import shard_samples

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
MEMBERS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "video": VIDEO_EXTENSIONS}  # what each modality reads
Modality = Literal["image", "audio", "video"]
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")  # streamed by webdataset; cannot be checked here
GLOB_CHARACTERS = re.compile(r"[*?\[]")
EMPTY_SHARDS_IN_A_ROW = 64  # a training worker that reads this many shards without a sample gives up


# ---------------------------------------------------------------------------------------------
# Shard specs


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a spec: brace ranges (`/data/laion/{00000..41455}.tar`), globs, a folder
    (its .tar / .tar.gz files, sorted) or a comma/space separated list of those.

    Local paths are checked here, so a typo fails before training starts rather than in a worker.
    `pipe:` commands and URLs are passed to webdataset unchecked (a `pipe:` spec is one command).
    """
    spec = spec.strip()
    if spec.startswith("pipe:") or (spec and Path(spec).exists()):  # one command, or one path even with spaces
        items = [spec]
    else:
        items = [i for i in re.split(r"[,\s]+(?![^{]*})", spec) if i]
    if not items:
        raise LimoeError("the shard spec is empty; give a folder, a glob or a brace pattern such as data/{00000..00009}.tar.")
    try:
        return [shard for item in items for path in braceexpand.braceexpand(item) for shard in _resolve(path)]
    except LimoeError as error:
        if len(items) == 1:
            raise
        raise LimoeError(f"{error} (in the shard spec {spec!r}, which lists {len(items)} items separated by commas or "
                         f"spaces)") from None


def _resolve(path: str) -> list[str]:
    if REMOTE.match(path):
        return [path]
    if Path(path).is_dir():
        shards = sorted(str(p) for p in Path(path).iterdir() if p.name.endswith(SHARD_SUFFIXES))
        if not shards:
            raise LimoeError(f"folder {path} holds no .tar or .tar.gz shards; point the spec at the shard folder.")
        return shards
    if GLOB_CHARACTERS.search(path):
        shards = sorted(glob.glob(path))
        if not shards:
            raise LimoeError(f"no files match the shard pattern {path}; check the path and the pattern.")
        return shards
    if not Path(path).is_file():
        raise LimoeError(f"shard {path} does not exist (relative paths start at {Path.cwd()}); check the path.")
    return [path]


def _first_sample(shard: str) -> Optional[dict]:
    """The first sample of a local shard, for checks made before any worker starts: {} when the
    shard holds none, None when it cannot be checked here (remote, or unreadable: the loader
    counts that as bad data)."""
    if REMOTE.match(shard):
        return None
    try:
        return next(iter(shard_samples(shard)), {})
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error):
        return None


def require_labels(spec: str) -> None:
    """Fail early when a classification set's first sample has no `.cls` label (local shards only)."""
    first = expand_shards(spec)[0]
    sample = _first_sample(first)
    if sample is not None and "cls" not in sample:
        raise LimoeError(
            f"shard {first} holds no .cls labels, so it cannot feed a classification task; build labelled shards "
            f"with `limoe shards build --classification`, or make the task contrastive."
        )


def read_classnames(spec: str) -> list[str]:
    """Class names of a classification shard set, from the classnames.txt beside its first shard."""
    path = Path(expand_shards(spec)[0]).parent / "classnames.txt"
    if not path.is_file():
        raise LimoeError(f"{path} does not exist; build classification shards with `limoe shards build --classification`.")
    return [line.strip() for line in read_text_file(path, "class names file").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Batches and bad-sample accounting


class TrainBatch(NamedTuple):
    """A training batch of inputs and their captions. The inputs are named `images` whatever the
    modality: images [B, 3, H, W] uint8, cropped, normalised on the device (preprocess.normalize),
    or with resize_on="device" an Uncropped until DeviceBatches crops it; audio clips [B, T]
    float32 mono waveforms, T = round(sample_rate · clip_seconds), turned into features on the device;
    video clips [B, T, 3, S, S] uint8, T = frames, cropped, normalised on the device as images are."""

    images: Union[torch.Tensor, Uncropped]
    tokens: torch.Tensor  # [B, L] int64, open_clip BPE tokens, zero padded


class LabelledBatch(NamedTuple):
    """A training batch of a classification task: inputs as in TrainBatch (audio: [B, T] float32;
    video: [B, T, 3, S, S] uint8)."""

    images: Union[torch.Tensor, Uncropped]
    labels: torch.Tensor  # [B] int64 `.cls` labels


class EvalBatch(NamedTuple):
    # [B, 3, H, W] float32, normalised; with resize_on="device" an Uncropped, which
    # `limoe.data.crops.eval_images_on` crops and normalises on the model's device; audio clips [B, T] float32;
    # video clips [B, T, 3, S, S] float32, normalised
    images: Union[torch.Tensor, Uncropped]
    keys: list[str]  # sample keys, to join results with the shards
    tokens: Optional[torch.Tensor]  # [B, L] int64 for caption sets, else None
    labels: Optional[torch.Tensor]  # [B] int64 `.cls` labels for classification sets, else None


@dataclass
class WorkerTally:
    """Samples one data worker has read and skipped; a copy travels with each of its batches."""

    worker: int
    seen: int = 0
    raw: int = 0  # samples found in shards, before parsing
    bad: dict[str, int] = field(default_factory=dict)
    latest: Optional[tuple[str, str, str]] = None  # (reason, shard, key) of the latest bad sample
    done: bool = False  # the worker has finished its share
    starved_at: Optional[str] = None  # a training worker gave up after shards without one sample; the last

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    def skip(self, reason: str, shard: str, key: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1
        self.latest = (reason, shard, key)

    def too_bad(self, max_fraction: float, check_after: int) -> bool:
        """Over the limit, judged once enough samples were read or the worker's share is done."""
        return (self.seen >= check_after or self.done) and self.total_bad > max_fraction * self.seen

    def copy(self) -> WorkerTally:
        return replace(self, bad=dict(self.bad))


class BadSampleCounter:
    """Bad samples in the current pass over a loader, summed over its workers' latest tallies."""

    def __init__(self, max_bad_fraction: float, check_after: int):
        self.max_bad_fraction = max_bad_fraction
        self.check_after = check_after
        self.tallies: dict[int, WorkerTally] = {}

    @property
    def seen(self) -> int:
        return sum(t.seen for t in self.tallies.values())

    @property
    def bad(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for tally in self.tallies.values():
            for reason, count in tally.bad.items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    def summary(self) -> str:
        """The skipped samples and, with data.decode_on device, the images the CPU decoded instead."""
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.bad.items())) or "none"
        fallbacks = f"; {FALLBACKS.summary()}" if FALLBACKS.total else ""
        return f"{sum(self.bad.values())} of {self.seen} samples skipped ({reasons}){fallbacks}"

    def update(self, tally: WorkerTally) -> None:
        if tally.starved_at is not None:
            raise LimoeError(
                f"data worker {tally.worker} read {EMPTY_SHARDS_IN_A_ROW} shards in a row without a single sample "
                f"(the last was {tally.starved_at}): the training shards are empty or unreadable; check data.train."
            )
        before = sum(self.bad.values())
        self.tallies[tally.worker] = tally
        after = sum(self.bad.values())
        if after.bit_length() > before.bit_length():  # log at 1, 2, 4, 8, … bad samples
            reason, shard, key = tally.latest
            logger.warning("data: %s; latest: %s at key %s in %s", self.summary(), reason, key, shard)
        if tally.too_bad(self.max_bad_fraction, self.check_after):
            reason, shard, key = tally.latest
            raise LimoeError(
                f"{tally.total_bad} of {tally.seen} samples read by data worker {tally.worker} were unusable "
                f"({', '.join(f'{r} {n}' for r, n in sorted(tally.bad.items()))}), more than max_bad_fraction "
                f"{self.max_bad_fraction}; the latest was {reason} at key {key} in shard {shard}: repair or remove "
                f"that data, or raise data.max_bad_fraction."
            )

    def reset(self) -> None:
        self.tallies.clear()


class _BadSample(Exception):
    """Raised while parsing a sample; `args[0]` is the reason it is skipped."""


# ---------------------------------------------------------------------------------------------
# Per-sample parsing


def _parse(sample: dict, modality: Modality, classification: bool, decode: Callable[[bytes], object],
           draws: Optional[random.Random]) -> tuple[str, object, object]:
    """(key, decoded input, caption or label), or _BadSample. The cheap checks come before `decode`
    (an image to RGB, an audio member to its clip, a video member to its frames); `draws` picks an
    audio or video sample's caption from its list in training (None: the first)."""
    extensions = MEMBERS[modality]
    extension = next((e for e in extensions if e in sample), None)
    if extension is None:
        raise _BadSample(f"no_{modality}")
    if classification:
        target = _label(sample)
    else:
        target = _caption(sample) if modality == "image" else _listed_caption(sample, draws)
    return sample["__key__"], decode(sample[extension]), target


def _caption(sample: dict) -> str:
    if "txt" not in sample:
        raise _BadSample("no_caption")
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _BadSample("bad_caption") from None
    if not caption:
        raise _BadSample("empty_caption")
    return caption


def _listed_caption(sample: dict, draws: Optional[random.Random]) -> str:
    """The `.txt` caption, else one of the captions LAION-CLAP's audio shards (and video shards) list
    in the `.json` sidecar's `"text"` (a string or a list): drawn with `draws` in training, so that
    every one is used, and the first in evaluation. Empty entries of the list are passed over."""
    if "txt" in sample or "json" not in sample:
        return _caption(sample)
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _BadSample("bad_caption") from None
    text = meta.get("text") if isinstance(meta, dict) else None
    if text is None:
        raise _BadSample("no_caption")
    listed = [text] if isinstance(text, str) else text
    if not isinstance(listed, list) or not all(isinstance(caption, str) for caption in listed):
        raise _BadSample("bad_caption")
    captions = [caption.strip() for caption in listed if caption.strip()]
    if not captions:
        raise _BadSample("empty_caption")
    return draws.choice(captions) if draws is not None else captions[0]


def _label(sample: dict) -> int:
    if "cls" not in sample:
        raise _BadSample("no_label")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise _BadSample("bad_label") from None
    if label < 0:  # a class index; a negative one would silently index classes from the end
        raise _BadSample("bad_label")
    return label


def _decode_image(data: bytes, min_side: int) -> Image.Image:
    try:
        return decode_rgb(io.BytesIO(data), min_side)
    except UnusableImage as unusable:
        raise _BadSample(unusable.args[0]) from None


def _read_header(data: bytes) -> tuple[Header, bytes]:
    """With decode_on="device": an image's header (its bounds checked) and its bytes, not decoded."""
    try:
        return read_header(data), data
    except UnusableImage as unusable:
        raise _BadSample(unusable.args[0]) from None


def _decode_audio(data: bytes, rate: int, seconds: float, draws: Optional[random.Random]) -> np.ndarray:
    """The [round(rate·seconds)] float32 clip: a window drawn with `draws` (training), else the centre one."""
    try:
        return decode_clip(data, rate, seconds, "random" if draws is not None else "centre", draws)
    except UnusableAudio as unusable:
        raise _BadSample(unusable.args[0]) from None


def _decode_video(data: bytes, frames: int, stride: int, draws: Optional[random.Random]) -> list[Image.Image]:
    """The clip's `frames` RGB frames: a window drawn with `draws` (training), else the centre one."""
    try:
        return decode_frames(data, frames, stride, "random" if draws is not None else "centre", draws)
    except UnusableVideo as unusable:
        raise _BadSample(unusable.args[0]) from None


# ---------------------------------------------------------------------------------------------
# What one worker runs


def _shard_samples(url: str, tally: WorkerTally) -> Iterator[dict]:
    """Raw samples of one shard; a shard that cannot be read to the end counts as one bad sample."""
    key = "(none yet)"
    try:
        for sample in shard_samples(url):
            key = sample["__key__"]
            tally.raw += 1
            yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error):
        tally.seen += 1
        tally.skip("broken_shard", url, f"after {key}")


def _mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Each sample from a source picked with probability ∝ weight (wds.RandomMix with a seeded
    generator). Training sources are endless; one ends only when its data was too bad to go on."""
    while True:
        sample = next(rng.choices(streams, weights)[0], None)
        if sample is None:
            return
        yield sample


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _needed_side(image_size: int, train: bool) -> int:
    """The shorter side a decoded image needs: what the smallest random crop spans, or the eval crop."""
    return min_decoded_side(image_size) if train else image_size


def _collate(records: list, context_length: int, image_size: int, train: bool, classification: bool,
             uncropped: bool, encoded: bool, modality: Modality):
    keys, images, targets = zip(*records)
    if modality == "audio":
        images = torch.from_numpy(np.stack(images))  # [B, T] float32 waveforms
    elif modality == "video":
        images = torch.from_numpy(np.stack(images))  # [B, T, 3, S, S] uint8
        images = images if train else normalize(images)
    elif encoded:  # each record holds (header, bytes, region, window); decoded and resized on the device
        images = encoded_batch(*map(list, zip(*images)), image_size, _needed_side(image_size, train))
    elif uncropped and train:  # each record holds its box's pixels, resized on the device
        images = uncropped_batch(list(images), image_size)
    elif uncropped:  # each record holds a Window: pixels and the eval crop's window in them
        images = uncropped_batch([w.pixels for w in images], image_size, [w.window for w in images])
    else:
        images = stack_crops(images)
        images = images if train else normalize(images)
    if classification:
        labels = torch.tensor(targets, dtype=torch.int64)
        return LabelledBatch(images, labels) if train else EvalBatch(images, list(keys), None, labels)
    tokens = tokenizer(context_length)(list(targets))
    return TrainBatch(images, tokens) if train else EvalBatch(images, list(keys), tokens, None)


@dataclass
class _ShardStream(IterableDataset):
    """The per-worker pipeline. Yields (batch, tally) pairs and, when its share is done (or too
    much of it was bad), a last (None, tally) so the main process gets the final counts."""

    sources: list[list[str]]
    weights: list[float]
    train: bool
    batch_size: int
    image_size: int
    context_length: int
    classification: bool
    shuffle_buffer: int
    resampled: bool
    seed: int
    rank: int
    world_size: int
    max_bad_fraction: float
    check_after: int
    resize_on: Literal["worker", "device"] = "worker"
    decode_on: Literal["worker", "device"] = "worker"
    modality: Modality = "image"
    sample_rate: Optional[int] = None  # audio: Hz of the clips batched
    clip_seconds: Optional[float] = None  # audio: length of the clips batched
    frames: Optional[int] = None  # video: frames per clip batched
    frame_stride: Optional[int] = None  # video: source frames from one batched frame to the next

    def __iter__(self) -> Iterator[tuple[Optional[tuple], WorkerTally]]:
        worker, workers = _worker()
        tally = WorkerTally(worker)
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}")
        # audio and video windows and captions: apart from `rng`, so they leave the shard order and shuffle as they were
        draws = random.Random(f"{self.seed}/{self.rank}/{worker}/draws") if self.train else None
        streams = [self._read(self._urls(source, worker, workers, rng), tally) for source in range(len(self.sources))]
        samples = streams[0] if len(streams) == 1 else _mix(streams, self.weights, rng)
        if self.train and self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, rng=rng)(samples)
        usable = self._usable(samples, tally, draws)
        records = ((key, self._prepare(decoded), target) for key, decoded, target in usable)
        collate = functools.partial(_collate, context_length=self.context_length, image_size=self.image_size,
                                    train=self.train, classification=self.classification,
                                    uncropped=self.resize_on == "device", encoded=self.decode_on == "device",
                                    modality=self.modality)
        for batch in wds.batched(self.batch_size, collation_fn=collate, partial=not self.train)(records):
            yield batch, tally.copy()
        tally.done = True
        yield None, tally.copy()

    def _prepare(self, image: Union[Image.Image, np.ndarray, tuple[Header, bytes], list[Image.Image]]
                 ) -> Union[np.ndarray, Window, tuple]:
        """What a batch carries of one decoded input: an audio clip as it is (cropped when decoded);
        a video clip's frames cropped by one box to [T, 3, S, S] uint8 (`limoe.data.crops.crop_clip`);
        an image's [S, S, 3] uint8 crop, or with resize_on="device" the [h, w, 3] uint8 pixels of its
        random box (training) or the pixels around its centre crop and the crop's window in them
        (evaluation). With decode_on="device" the image is (header, bytes), and the same boxes are
        drawn from the header's size: (header, bytes, the region the crop reads, the crop's window in it)."""
        if self.modality == "audio":
            return image
        if self.modality == "video":
            return crop_clip(image, self.image_size, self.train)
        if self.decode_on == "device":
            header, data = image
            if not self.train:
                return (header, data, *centre_region(header.size, self.image_size))
            box = draw_box(header, self.image_size)
            return header, data, Region(*box), (0.0, 0.0, float(box.height), float(box.width))
        if not self.train:
            if self.resize_on == "device":
                return centre_window(image, self.image_size)
            return np.asarray(eval_crop(self.image_size)(image))
        box = draw_box(image, self.image_size)
        if self.resize_on == "device":
            return box_pixels(image, box)
        return crop_in_worker(image, box, self.image_size)

    def _urls(self, source: int, worker: int, workers: int, rng: random.Random) -> Iterator[str]:
        """This worker's shards: random draws, or its slice of each epoch's order (one epoch for eval)."""
        urls = self.sources[source]
        if self.train and self.resampled:
            while True:
                yield rng.choice(urls)
        for epoch in itertools.count() if self.train else range(1):
            order = list(urls)
            if self.train:  # the same order on every rank and worker, so the slices partition it
                random.Random(f"{self.seed}/{source}/{epoch}").shuffle(order)
            yield from order[self.rank * workers + worker :: self.world_size * workers]

    def _read(self, urls: Iterable[str], tally: WorkerTally) -> Iterator[dict]:
        """Samples of these shards, until broken shards alone pass the bad-sample limit or, in
        training, `EMPTY_SHARDS_IN_A_ROW` shards in a row gave no sample: an endless stream of
        unreadable or empty shards would otherwise never yield and never fail."""
        empty_in_a_row = 0
        for url in urls:
            read = tally.raw
            yield from _shard_samples(url, tally)
            empty_in_a_row = empty_in_a_row + 1 if tally.raw == read else 0
            if self.train and empty_in_a_row == EMPTY_SHARDS_IN_A_ROW:
                tally.starved_at = url
                return
            if tally.too_bad(self.max_bad_fraction, self.check_after):
                return

    def _decoder(self, draws: Optional[random.Random]) -> Callable[[bytes], object]:
        """Encoded bytes → an audio clip at the model's rate and length; a video clip's frames; an RGB
        image decoded with its shorter side reduced towards what the crop needs where it is much
        larger; or, with decode_on="device", only the image's header read (and its bytes kept for
        the device)."""
        if self.modality == "audio":
            return functools.partial(_decode_audio, rate=self.sample_rate, seconds=self.clip_seconds, draws=draws)
        if self.modality == "video":
            return functools.partial(_decode_video, frames=self.frames, stride=self.frame_stride, draws=draws)
        if self.decode_on == "device":
            return _read_header
        return functools.partial(_decode_image, min_side=_needed_side(self.image_size, self.train))

    def _usable(self, samples: Iterable[dict], tally: WorkerTally, draws: Optional[random.Random]) -> Iterator[tuple]:
        """Parsed samples; bad ones are counted, and reading stops once they pass the limit."""
        decode = self._decoder(draws)
        for sample in samples:
            tally.seen += 1
            try:
                yield _parse(sample, self.modality, self.classification, decode, draws)
            except _BadSample as bad:
                tally.skip(bad.args[0], sample["__url__"], sample["__key__"])
                if tally.too_bad(self.max_bad_fraction, self.check_after):
                    return


class ShardLoader(DataLoader):
    """A DataLoader over shards whose `bad_samples` counts what its workers skipped this pass."""

    def __init__(self, stream: _ShardStream, workers: int, pin_memory: bool):
        generator = torch.Generator().manual_seed(random.Random(f"{stream.seed}/{stream.rank}/torch").getrandbits(63))
        super().__init__(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, generator=generator)
        self.bad_samples = BadSampleCounter(stream.max_bad_fraction, stream.check_after)

    def __iter__(self):
        self.bad_samples.reset()
        for batch, tally in super().__iter__():
            self.bad_samples.update(tally)
            if batch is not None:
                yield batch


# ---------------------------------------------------------------------------------------------
# Public constructors


def _modality_settings(modality: str, sample_rate: Optional[int], clip_seconds: Optional[float],
                       frames: Optional[int], frame_stride: Optional[int]) -> None:
    """Refuse a modality the loaders cannot read, audio without a positive rate and clip length, or
    video without a positive frame count and stride."""
    if modality not in MEMBERS:
        raise LimoeError(f"modality {modality!r} cannot be read from shards; use 'image', 'audio' or 'video'.")
    if modality == "audio" and not (sample_rate and sample_rate > 0 and clip_seconds and clip_seconds > 0):
        raise LimoeError(f"audio shards need a positive sample rate and clip length (got {sample_rate} Hz, "
                         f"{clip_seconds} s); set model.audio.sample_rate and model.audio.clip_seconds.")
    if modality == "video" and not all(isinstance(n, int) and n > 0 for n in (frames, frame_stride)):
        raise LimoeError(f"video shards need a positive whole number of frames and frame stride (got frames "
                         f"{frames}, frame_stride {frame_stride}); set model.video.frames and model.video.frame_stride.")


def _require_video_decoder(shards: list[str]) -> None:
    """Stop before any worker starts when the first shard holds video files and PyAV is missing:
    the error of a worker reaches the user wrapped in its traceback."""
    sample = _first_sample(shards[0])
    if sample and any(extension in sample for extension in VIDEO_FILE_EXTENSIONS):
        require_pyav()


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """The given rank and world size (tests pass them), else the process group's."""
    if rank is not None and world_size is not None:
        return rank, world_size
    return rank_and_world()


def _check_decode_on(resize_on: str, decode_on: str) -> None:
    if decode_on == "device" and resize_on != "device":
        raise LimoeError("data.decode_on device leaves the workers no pixels to crop; set data.resize_on: device too.")


def check_batch_fits_in_memory(batch_size: int, image_size: int, workers: int,
                               resize_on: Literal["worker", "device"] = "worker", frames: int = 1) -> None:
    """Refuse, before anything is read or built, a per-process batch whose images cannot fit in
    this machine's memory: each data worker keeps `prefetch_factor` (2) batches ready, and one
    more is being trained on and one collated (two with no workers). Uncropped batches
    (resize_on="device") are counted at the largest box they can carry; video clips as `frames`
    images each (they are always cropped in the worker)."""
    side = largest_box_side(image_size) if resize_on == "device" and frames == 1 else image_size
    # uint8 [B, 3, S, S] as training batches travel, [B, H, W, 3] uncropped, or [B, T, 3, S, S] video clips
    batch_bytes = batch_size * frames * 3 * side * side
    in_flight = 2 * workers + 2
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun, deepspeed
    needed = batch_bytes * in_flight * processes_here
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise LimoeError(
            f"train.batch_size gives {batch_size} pairs per process, whose {'clips' if frames > 1 else 'images'} "
            f"alone need {needed / 2**30:.3g} GiB of host memory ({in_flight} batches in flight with data.workers "
            f"{workers}, x {processes_here} processes on this machine{_counted_as(resize_on, frames)}), "
            f"more than its {available / 2**30:.0f} GiB; lower train.batch_size or spread it over more machines."
        )


def _counted_as(resize_on: str, frames: int) -> str:
    if frames > 1:
        return f", {frames} frames a clip"
    return ", uncropped for data.resize_on device" if resize_on == "device" else ""


def loader_options(config: ModelConfig, modality: str) -> dict:
    """The `train_loader` / `eval_loader` keywords that read `modality`'s samples as `config`'s model
    takes them (none for images, the defaults)."""
    if modality == "image":
        return {}
    if modality == "video":
        return {"modality": modality, "frames": config.video.frames, "frame_stride": config.video.frame_stride}
    return {"modality": modality, "sample_rate": config.audio.sample_rate, "clip_seconds": config.audio.clip_seconds}


def train_loader(
    sources: tuple[ShardSource, ...],
    batch_size: int,
    image_size: int,
    context_length: int,
    workers: int,
    shuffle_buffer: int,
    resampled: bool,
    seed: int,
    max_bad_fraction: float,
    *,
    classification: bool = False,
    bad_check_after: int = 1000,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    pin_memory: bool = False,
    resize_on: Literal["worker", "device"] = "worker",
    decode_on: Literal["worker", "device"] = "worker",
    modality: Modality = "image",
    sample_rate: Optional[int] = None,
    clip_seconds: Optional[float] = None,
    frames: Optional[int] = None,
    frame_stride: Optional[int] = None,
) -> ShardLoader:
    """An endless loader of TrainBatch(images, tokens), or with `classification` of
    LabelledBatch(images, labels) from shards with `.cls`; `batch_size` is per rank. With
    `resize_on="device"` the images are `Uncropped` and `DeviceBatches` crops them; with
    `decode_on="device"` (which needs `resize_on="device"`) they are still encoded, and the device
    decodes them first (`limoe.data.device_decode`).

    `modality="audio"` reads audio shards instead: the inputs are [B, T] float32 clips,
    T = round(sample_rate · clip_seconds), each a random window of its sample's audio, and the
    caption one drawn from its list; `image_size` and `resize_on` are not used then.
    `modality="video"` reads video shards: the inputs are [B, T, 3, S, S] uint8 clips, T = `frames`
    frames `frame_stride` source frames apart from a random window, all cropped by one random box
    of the image crop's distribution to S = `image_size` (in the worker, whatever `resize_on`).

    Rank and world size come from torch.distributed when it is initialised (0 and 1 otherwise);
    the arguments override them. `bad_check_after`: samples a worker reads before the bad
    fraction is judged (a stray bad sample among the first few should not stop a run).
    """
    _modality_settings(modality, sample_rate, clip_seconds, frames, frame_stride)
    rank, world_size = _rank_and_world(rank, world_size)
    _check_decode_on(resize_on, decode_on)
    if not sources:
        raise LimoeError("data.train lists no shard sources; name at least one shard folder or pattern.")
    shards = [expand_shards(source.shards) for source in sources]
    if modality == "video":
        for urls in shards:
            _require_video_decoder(urls)
    parts = world_size * max(workers, 1)
    for source, urls in zip(sources, shards):
        if not resampled and len(urls) < parts:
            raise LimoeError(
                f"data.train source {source.shards} has {len(urls)} shards, fewer than ranks x workers = {parts}, "
                f"so some workers would get none; set data.resampled: true, use fewer workers or split the shards finer."
            )
    stream = _ShardStream(
        shards, mixing_weights(sources, shards), train=True, batch_size=batch_size, image_size=image_size,
        context_length=context_length, classification=classification, shuffle_buffer=shuffle_buffer,
        resampled=resampled, seed=seed, rank=rank, world_size=world_size, max_bad_fraction=max_bad_fraction,
        check_after=bad_check_after, resize_on=resize_on, decode_on=decode_on, modality=modality,
        sample_rate=sample_rate, clip_seconds=clip_seconds, frames=frames, frame_stride=frame_stride,
    )
    return ShardLoader(stream, workers, pin_memory)


def eval_loader(
    spec: str,
    batch_size: int,
    image_size: int,
    context_length: int,
    workers: int,
    *,
    classification: bool = False,
    max_bad_fraction: float = 0.01,
    bad_check_after: int = 1000,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    pin_memory: bool = False,
    resize_on: Literal["worker", "device"] = "worker",
    decode_on: Literal["worker", "device"] = "worker",
    modality: Modality = "image",
    sample_rate: Optional[int] = None,
    clip_seconds: Optional[float] = None,
    frames: Optional[int] = None,
    frame_stride: Optional[int] = None,
) -> ShardLoader:
    """One pass of EvalBatch(images, keys, tokens, labels): every sample exactly once across ranks
    and workers, eval transforms (resize the shorter side, center crop), the last batch partial.
    With `resize_on="device"` the images are `Uncropped` (the decoded pixels and their centre-crop
    windows), which `limoe.data.crops.eval_images_on` crops and normalises on the device; with
    `decode_on="device"` too, still encoded, and decoded there first.
    With `modality="audio"`, `images` holds [B, T] float32 clips, T = round(sample_rate ·
    clip_seconds), each the centre window of its sample's audio, and `tokens` its first caption.
    With `modality="video"`, `images` holds [B, T, 3, S, S] float32 clips, normalised: T = `frames`
    frames `frame_stride` apart from the centre window, each resized and centre-cropped as images are.

    Caption sets (`classification=False`) need `.txt` and fill `tokens`; classification sets need
    `.cls` and fill `labels` (class names: `read_classnames(spec)`). Shards are dealt out whole,
    so ranks may get different numbers of samples when shard sizes differ.
    """
    _modality_settings(modality, sample_rate, clip_seconds, frames, frame_stride)
    rank, world_size = _rank_and_world(rank, world_size)
    _check_decode_on(resize_on, decode_on)
    shards = expand_shards(spec)
    if modality == "video":
        _require_video_decoder(shards)
    stream = _ShardStream(
        [shards], [1.0], train=False, batch_size=batch_size, image_size=image_size,
        context_length=context_length, classification=classification, shuffle_buffer=0, resampled=False, seed=0,
        rank=rank, world_size=world_size, max_bad_fraction=max_bad_fraction, check_after=bad_check_after,
        resize_on=resize_on, decode_on=decode_on, modality=modality, sample_rate=sample_rate,
        clip_seconds=clip_seconds, frames=frames, frame_stride=frame_stride,
    )
    return ShardLoader(stream, workers, pin_memory)
