"""Input pipelines: webdataset shards to batches of images, audio or video clips and caption tokens.

Each DataLoader worker runs the whole pipeline on its own share of the shards: read tar files,
group members into samples, shuffle in memory (training), decode, crop, tokenize and batch.
Batches cross the process boundary whole, which keeps per-sample Python overhead inside workers.
Training crops are resized in the worker or, with `resize_on="device"`, on the device after the
batch is copied there (`limoe.data.crops`); images are decoded at a reduced scale when they are
much larger than the crop needs (`limoe.data.images`).

What is particular to a modality — which members hold its input, how they decode, what of a
decoded input a batch carries and how a batch's inputs stack — is its reader's
(`limoe.data.readers`: images; audio shards, LAION-CLAP's layout, `KEY.flac` and a `KEY.json` whose
`"text"` lists captions, decoded at the model's rate and length; video shards, `KEY.mp4`, `KEY.webm`
or a filmstrip, decoded to the model's frames); this module does the rest the same for all of them.

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
from typing import Iterable, Iterator, Literal, NamedTuple, Optional, Union

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from limoe.config import ModelConfig, ShardSource
from limoe.distributed import rank_and_world
from limoe.errors import LimoeError
from limoe.data.crops import Uncropped
from limoe.data.device_decode import FALLBACKS
from limoe.data.preprocess import tokenizer
from limoe.data.readers import Reader, reader_type
from limoe.files import read_text_file
from limoe.data.sources import mixing_weights
from limoe.data.tar_members import shard_samples

logger = logging.getLogger(__name__)

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


def _parse(sample: dict, reader: Reader, classification: bool, train: bool,
           draws: Optional[random.Random]) -> tuple[str, object, object]:
    """(key, decoded input, caption or label), or _BadSample. The cheap checks come before the
    reader decodes its member (an image to RGB, an audio member to its clip, a video member to its
    frames); `draws` picks the reader's random windows and, where captions come listed, a sample's
    caption from its list in training (None: the first)."""
    extension = next((e for e in reader.extensions if e in sample), None)
    if extension is None:
        raise _BadSample(f"no_{reader.name}")
    if classification:
        target = _label(sample)
    else:
        target = _listed_caption(sample, draws) if reader.listed_captions else _caption(sample)
    try:
        decoded = reader.decode(sample[extension], train, draws)
    except reader.unusable as unusable:
        raise _BadSample(unusable.args[0]) from None
    return sample["__key__"], decoded, target


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


def _collate(records: list, reader: Reader, context_length: int, train: bool, classification: bool):
    keys, inputs, targets = zip(*records)
    images = reader.collate(list(inputs), train)
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
    reader: Reader  # what the samples' inputs are and how they are read
    context_length: int
    classification: bool
    shuffle_buffer: int
    resampled: bool
    seed: int
    rank: int
    world_size: int
    max_bad_fraction: float
    check_after: int

    def __iter__(self) -> Iterator[tuple[Optional[tuple], WorkerTally]]:
        worker, workers = _worker()
        tally = WorkerTally(worker)
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}")
        # readers' random windows (audio, video) and captions: apart from `rng`, so they leave the shard order and shuffle as they were
        draws = random.Random(f"{self.seed}/{self.rank}/{worker}/draws") if self.train else None
        streams = [self._read(self._urls(source, worker, workers, rng), tally) for source in range(len(self.sources))]
        samples = streams[0] if len(streams) == 1 else _mix(streams, self.weights, rng)
        if self.train and self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, rng=rng)(samples)
        usable = self._usable(samples, tally, draws)
        records = ((key, self.reader.prepare(decoded, self.train), target) for key, decoded, target in usable)
        collate = functools.partial(_collate, reader=self.reader, context_length=self.context_length,
                                    train=self.train, classification=self.classification)
        for batch in wds.batched(self.batch_size, collation_fn=collate, partial=not self.train)(records):
            yield batch, tally.copy()
        tally.done = True
        yield None, tally.copy()

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

    def _usable(self, samples: Iterable[dict], tally: WorkerTally, draws: Optional[random.Random]) -> Iterator[tuple]:
        """Parsed samples; bad ones are counted, and reading stops once they pass the limit."""
        for sample in samples:
            tally.seen += 1
            try:
                yield _parse(sample, self.reader, self.classification, self.train, draws)
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


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """The given rank and world size (tests pass them), else the process group's."""
    if rank is not None and world_size is not None:
        return rank, world_size
    return rank_and_world()


def _check_decode_on(resize_on: str, decode_on: str) -> None:
    if decode_on == "device" and resize_on != "device":
        raise LimoeError("data.decode_on device leaves the workers no pixels to crop; set data.resize_on: device too.")


class LocalBatch(NamedTuple):
    """One training loader's batch on one process, as the host-memory check counts it."""

    setting: str  # the key that sets its size, as a user writes it: train.batch_size, tasks[sounds].batch_size
    size: int  # samples per process
    modality: str  # what its samples carry beside text: image, audio, video


def input_bytes(config: ModelConfig, modality: str, resize_on: Literal["worker", "device"] = "worker") -> int:
    """Host bytes of one sample's `modality` input as training batches travel: an image uint8
    [3, S, S] (or [H, W, 3] uncropped, at the largest box it can carry), an audio clip float32 [T]
    of the model's length, a video clip uint8 [T, 3, S, S] (always cropped in the worker); the
    caption's tokens are left out, small beside any of them."""
    return reader_type(modality).input_bytes(config, resize_on)


def check_batch_fits_in_memory(batches: list[LocalBatch], config: ModelConfig, workers: int,
                               resize_on: Literal["worker", "device"] = "worker") -> None:
    """Refuse, before anything is read or built, per-process batches whose images or clips cannot
    fit in this machine's memory. Each loader (one per co-training task, all reading at once) keeps
    `prefetch_factor` (2) batches ready per data worker, and one more is being trained on and one
    collated (two with no workers). Uncropped images (resize_on="device") are counted at the largest
    box they can carry; a clip is its float32 samples (`input_bytes`)."""
    in_flight = 2 * workers + 2
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun, deepspeed
    needed = sum(batch.size * input_bytes(config, batch.modality, resize_on) for batch in batches) \
        * in_flight * processes_here
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        kinds = [reader_type(batch.modality) for batch in batches]
        uncropped = resize_on == "device" and any(kind.uncropped_on_device for kind in kinds)
        gives = ", ".join(f"{batch.setting} gives {batch.size} pairs per process" for batch in batches)
        inputs = " and ".join(sorted({kind.inputs for kind in kinds}))
        raise LimoeError(
            f"{gives}, whose {inputs} alone need {needed / 2**30:.3g} GiB of host memory ({in_flight} batches in "
            f"flight{' per loader' if len(batches) > 1 else ''} with data.workers {workers}, x {processes_here} "
            f"processes on this machine{', uncropped for data.resize_on device' if uncropped else ''}), more than its "
            f"{available / 2**30:.0f} GiB; lower {' or '.join(batch.setting for batch in batches)} or spread "
            f"{'them' if len(batches) > 1 else 'it'} over more machines."
        )


def loader_options(config: ModelConfig, modality: str) -> dict:
    """The `train_loader` / `eval_loader` keywords that read `modality`'s samples as `config`'s model
    takes them: the modality and its reader's own settings."""
    return {"modality": modality, **reader_type(modality).loader_options(config)}


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
    modality: str = "image",
    **options,
) -> ShardLoader:
    """An endless loader of TrainBatch(images, tokens), or with `classification` of
    LabelledBatch(images, labels) from shards with `.cls`; `batch_size` is per rank. With
    `resize_on="device"` the images are `Uncropped` and `DeviceBatches` crops them; with
    `decode_on="device"` (which needs `resize_on="device"`) they are still encoded, and the device
    decodes them first (`limoe.data.device_decode`).

    `modality` names the reader (`limoe.data.readers`) and `options` are its own settings, which
    `loader_options` reads off a model config. `modality="audio"` (options `sample_rate`,
    `clip_seconds`) reads audio shards instead: the inputs are [B, T] float32 clips,
    T = round(sample_rate · clip_seconds), each a random window of its sample's audio, and the
    caption one drawn from its list; `image_size` and `resize_on` are not used then.
    `modality="video"` (options `frames`, `frame_stride`) reads video shards: the inputs are
    [B, T, 3, S, S] uint8 clips, T = `frames`
    frames `frame_stride` source frames apart from a random window, all cropped by one random box
    of the image crop's distribution to S = `image_size` (in the worker, whatever `resize_on`).

    Rank and world size come from torch.distributed when it is initialised (0 and 1 otherwise);
    the arguments override them. `bad_check_after`: samples a worker reads before the bad
    fraction is judged (a stray bad sample among the first few should not stop a run).
    """
    reader = reader_type(modality).from_options(image_size, resize_on, decode_on, **options)
    rank, world_size = _rank_and_world(rank, world_size)
    _check_decode_on(resize_on, decode_on)
    if not sources:
        raise LimoeError("data.train lists no shard sources; name at least one shard folder or pattern.")
    shards = [expand_shards(source.shards) for source in sources]
    for urls in shards:
        reader.check_decoder(functools.partial(_first_sample, urls[0]))
    parts = world_size * max(workers, 1)
    for source, urls in zip(sources, shards):
        if not resampled and len(urls) < parts:
            raise LimoeError(
                f"data.train source {source.shards} has {len(urls)} shards, fewer than ranks x workers = {parts}, "
                f"so some workers would get none; set data.resampled: true, use fewer workers or split the shards finer."
            )
    stream = _ShardStream(
        shards, mixing_weights(sources, shards), train=True, batch_size=batch_size, reader=reader,
        context_length=context_length, classification=classification, shuffle_buffer=shuffle_buffer,
        resampled=resampled, seed=seed, rank=rank, world_size=world_size, max_bad_fraction=max_bad_fraction,
        check_after=bad_check_after,
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
    modality: str = "image",
    **options,
) -> ShardLoader:
    """One pass of EvalBatch(images, keys, tokens, labels): every sample exactly once across ranks
    and workers, eval transforms (resize the shorter side, center crop), the last batch partial.
    With `resize_on="device"` the images are `Uncropped` (the decoded pixels and their centre-crop
    windows), which `limoe.data.crops.eval_images_on` crops and normalises on the device; with
    `decode_on="device"` too, still encoded, and decoded there first.
    `modality` and `options` choose the reader as in `train_loader`.
    With `modality="audio"`, `images` holds [B, T] float32 clips, T = round(sample_rate ·
    clip_seconds), each the centre window of its sample's audio, and `tokens` its first caption.
    With `modality="video"`, `images` holds [B, T, 3, S, S] float32 clips, normalised: T = `frames`
    frames `frame_stride` apart from the centre window, each resized and centre-cropped as images are.

    Caption sets (`classification=False`) need `.txt` and fill `tokens`; classification sets need
    `.cls` and fill `labels` (class names: `read_classnames(spec)`). Shards are dealt out whole,
    so ranks may get different numbers of samples when shard sizes differ.
    """
    reader = reader_type(modality).from_options(image_size, resize_on, decode_on, **options)
    rank, world_size = _rank_and_world(rank, world_size)
    _check_decode_on(resize_on, decode_on)
    shards = expand_shards(spec)
    reader.check_decoder(functools.partial(_first_sample, shards[0]))
    stream = _ShardStream(
        [shards], [1.0], train=False, batch_size=batch_size, reader=reader,
        context_length=context_length, classification=classification, shuffle_buffer=0, resampled=False, seed=0,
        rank=rank, world_size=world_size, max_bad_fraction=max_bad_fraction, check_after=bad_check_after,
    )
    return ShardLoader(stream, workers, pin_memory)
