"""Input pipelines: shard specs, bad-sample accounting, epoch-exact eval, seeding, mixing, demo data."""

import collections
import io
import itertools
import json
import os
import re
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from limoe.config import ShardSource, load_model_config
from limoe.data import images
from limoe.data.pipeline import (
    EMPTY_SHARDS_IN_A_ROW,
    LocalBatch,
    check_batch_fits_in_memory,
    eval_loader,
    expand_shards,
    read_classnames,
    train_loader,
)
from limoe.data.crops import crop_in_worker, draw_box, stack_crops
from limoe.data.preprocess import image_transform, normalize
from limoe.errors import LimoeError

DEMO = Path(__file__).resolve().parents[2] / "data_shards"
CONTEXT = 16


def _image_bytes(seed: int, fmt: str = "JPEG", size=(24, 20)) -> bytes:
    image = Image.effect_noise(size, 40 + seed).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _good(key: str, caption: str = None, extension: str = "jpg", seed: int = 0) -> dict:
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[extension]
    return {"__key__": key, extension: _image_bytes(seed, fmt), "txt": caption or f"caption {key}",
            "json": json.dumps({"key": key, "status": "success"})}


def _captioned_shards(folder: Path, sizes: list[int], prefix: str = "s") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        _write_shard(folder / f"{index:05d}.tar", [_good(f"{prefix}{index}x{i}", seed=i) for i in range(size)])
        for index, size in enumerate(sizes)
    ]


def _eval_keys(spec: str, **kwargs) -> list[str]:
    loader = eval_loader(spec, kwargs.pop("batch_size", 4), 16, CONTEXT, kwargs.pop("workers", 0), **kwargs)
    return [key for batch in loader for key in batch.keys]


# ---------------------------------------------------------------------------------------------
# Shard specs


def test_expand_shards_accepts_folders_braces_globs_and_lists(tmp_path):
    shards = _captioned_shards(tmp_path / "set", [1, 1, 1])
    (tmp_path / "set" / "notes.txt").write_text("not a shard")
    folder = str(tmp_path / "set")
    assert expand_shards(folder) == shards
    assert expand_shards(f"{folder}/{{00000..00001}}.tar") == shards[:2]
    assert expand_shards(f"{folder}/0000[12].tar") == shards[1:]
    assert expand_shards(f"{shards[2]}, {shards[0]}  {shards[1]}") == [shards[2], shards[0], shards[1]]
    assert expand_shards("https://host/{0..1}.tar") == ["https://host/0.tar", "https://host/1.tar"]
    assert expand_shards("pipe:aws s3 cp s3://bucket/000.tar -") == ["pipe:aws s3 cp s3://bucket/000.tar -"]


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/missing/{{000..001}}.tar", "does not exist"),
    ("{tmp}/set/*.tgz", "no files match"),
    ("{tmp}/empty", "holds no .tar"),
    ("  ", "empty"),
])
def test_expand_shards_rejects_specs_that_match_nothing(tmp_path, spec, message):
    _captioned_shards(tmp_path / "set", [1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LimoeError, match=message):
        expand_shards(spec.format(tmp=tmp_path))


def test_missing_shards_fail_when_the_loader_is_built(tmp_path):
    with pytest.raises(LimoeError, match="does not exist"):
        train_loader((ShardSource(str(tmp_path / "nope")),), 4, 16, CONTEXT, 0, 10, True, 0, 0.01)


# ---------------------------------------------------------------------------------------------
# Bad data


def _shard_with_planted_faults(path: Path) -> tuple[str, set]:
    good = [_good("g0"), _good("g1", extension="png", seed=1), _good("g2", extension="webp", seed=2),
            _good("g3", extension="jpeg", seed=3)]
    jpeg = _image_bytes(7)
    bad = [
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "txt": "corrupt bytes"},
        {"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 2], "txt": "cut in half"},
        {"__key__": "empty", "jpg": jpeg, "txt": "   "},
        {"__key__": "uncaptioned", "jpg": jpeg, "json": "{}"},
        {"__key__": "gif", "gif": _image_bytes(8, "GIF"), "txt": "unsupported extension"},
    ]
    return _write_shard(path, good[:2] + bad + good[2:]), {"g0", "g1", "g2", "g3"}


PLANTED = {"bad_image": 2, "empty_caption": 1, "no_caption": 1, "no_image": 1}


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path):
    shard, good = _shard_with_planted_faults(tmp_path / "faulty.tar")
    loader = eval_loader(shard, 3, 16, CONTEXT, workers=2, max_bad_fraction=1.0)
    assert sorted(key for batch in loader for key in batch.keys) == sorted(good)
    assert loader.bad_samples.bad == PLANTED
    assert loader.bad_samples.seen == 9
    assert loader.bad_samples.summary() == "5 of 9 samples skipped (bad_image 2, empty_caption 1, no_caption 1, no_image 1)"


def test_training_yields_only_good_captions(tmp_path):
    shard, good = _shard_with_planted_faults(tmp_path / "faulty.tar")
    loader = train_loader((ShardSource(shard),), 4, 16, CONTEXT, 0, 10, True, 0, max_bad_fraction=1.0)
    expected = {tuple(row.tolist()) for row in SimpleTokenizer(context_length=CONTEXT)([f"caption {k}" for k in good])}
    batches = list(itertools.islice(loader, 6))
    assert {tuple(row.tolist()) for batch in batches for row in batch.tokens} <= expected
    assert set(loader.bad_samples.bad) == set(PLANTED)


@pytest.mark.parametrize("kind", ["eval", "train"])
def test_too_much_bad_data_names_a_shard_and_key(tmp_path, kind):
    shard, _ = _shard_with_planted_faults(tmp_path / "faulty.tar")
    if kind == "eval":
        loader = eval_loader(shard, 2, 16, CONTEXT, workers=0, max_bad_fraction=0.1, bad_check_after=5)
    else:
        loader = train_loader((ShardSource(shard),), 2, 16, CONTEXT, 2, 10, True, 0, 0.1, bad_check_after=5)
    with pytest.raises(LimoeError, match=r"at key \w+ in shard .*faulty\.tar"):
        list(itertools.islice(loader, 100))


def test_unreadable_shards_count_and_stop_an_endless_stream(tmp_path):
    good = _captioned_shards(tmp_path / "set", [6])[0]
    jpeg_bytes = Path(good).read_bytes()
    broken = tmp_path / "set" / "00001.tar"
    broken.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])  # cut inside the third sample
    loader = eval_loader(str(tmp_path / "set"), 4, 16, CONTEXT, 0, max_bad_fraction=1.0)
    keys = [key for batch in loader for key in batch.keys]
    assert len(keys) == 6 + 2 and loader.bad_samples.bad == {"broken_shard": 1}
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    endless = train_loader((ShardSource(str(garbage)),), 2, 16, CONTEXT, 0, 10, True, 0, 0.5, bad_check_after=10)
    with pytest.raises(LimoeError, match="broken_shard"):
        next(iter(endless))


# ---------------------------------------------------------------------------------------------
# Layout, epochs, seeds and mixing


def test_img2dataset_shards_load_without_conversion(tmp_path):
    samples = []
    for index in range(1, 6):
        key = f"{index:09d}"
        meta = {"url": f"https://example.com/{index}.jpg", "key": key, "status": "success", "error_message": None,
                "width": 24, "height": 20, "original_width": 480, "original_height": 400}
        samples.append({"__key__": key, "jpg": _image_bytes(index), "txt": f"photo {index}", "json": json.dumps(meta)})
    shard = _write_shard(tmp_path / "00000.tar", samples)
    (tmp_path / "00000_stats.json").write_text("{}")  # img2dataset writes these beside the shards
    (tmp_path / "00000.parquet").write_bytes(b"")
    assert _eval_keys(str(tmp_path)) == [s["__key__"] for s in samples]
    batch = next(iter(train_loader((ShardSource(shard),), 3, 32, CONTEXT, 0, 10, True, 0, 0.01)))
    assert batch.images.shape == (3, 3, 32, 32) and batch.tokens.shape == (3, CONTEXT)
    assert batch.images.dtype == torch.uint8  # normalised on the device


def test_uint8_training_images_normalize_to_exactly_what_the_float_transform_gives(monkeypatch):
    image = Image.open(io.BytesIO(_image_bytes(3, size=(40, 30)))).convert("RGB")
    box = draw_box(image, 32)
    monkeypatch.setattr(RandomResizedCrop, "get_params", staticmethod(lambda *args: box))  # the same crop
    expected = image_transform(32, train=True)(image)  # [3, 32, 32] float32, normalised
    cropped = stack_crops([crop_in_worker(image, box, 32)])  # [1, 3, 32, 32] uint8
    assert cropped.dtype == torch.uint8
    assert torch.equal(normalize(cropped)[0], expected)


def test_eval_images_are_exactly_open_clips_eval_transform(tmp_path):
    samples = [_good(f"k{i}", seed=i) for i in range(3)]
    shard = _write_shard(tmp_path / "eval.tar", samples)
    batch = next(iter(eval_loader(shard, 3, 15, CONTEXT, 0)))
    expected = torch.stack([image_transform(15, train=False)(Image.open(io.BytesIO(s["jpg"]))) for s in samples])
    assert batch.images.dtype == torch.float32 and torch.equal(batch.images, expected)


def test_eval_reads_every_sample_exactly_once_across_ranks_and_workers(tmp_path):
    shards = _captioned_shards(tmp_path / "set", [3, 7, 1, 4, 6])
    keys = []
    for rank in range(2):
        keys += _eval_keys(str(tmp_path / "set"), rank=rank, world_size=2, workers=2, batch_size=4)
    counts = collections.Counter(keys)
    assert len(counts) == 21 and set(counts.values()) == {1}
    assert len(shards) == 5


@pytest.mark.parametrize("resampled", [True, False])
def test_training_is_deterministic_given_a_seed(tmp_path, resampled):
    _captioned_shards(tmp_path / "set", [10, 10, 10, 10])
    source = (ShardSource(str(tmp_path / "set")),)

    def batches(seed):
        loader = train_loader(source, 8, 16, CONTEXT, 2, 16, resampled, seed, 0.01)
        return list(itertools.islice(loader, 4))

    first, again, other = batches(0), batches(0), batches(1)
    for a, b in zip(first, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
    assert not all(torch.equal(a.tokens, c.tokens) for a, c in zip(first, other))


@pytest.mark.parametrize("by", ["weight", "size"])
def test_sources_mix_by_weight_or_by_recorded_size(tmp_path, by):
    """3:1 either as weights or as the sizes img2dataset recorded (the shards themselves hold 20 each)."""
    alpha = _captioned_shards(tmp_path / "alpha", [20, 20], prefix="alpha")
    beta = _captioned_shards(tmp_path / "beta", [20, 20], prefix="beta")
    if by == "weight":
        sources = (ShardSource(",".join(alpha), weight=3.0), ShardSource(",".join(beta), weight=1.0))
    else:
        for shard, successes in zip(alpha + beta, [45, 45, 15, 15]):
            Path(shard.replace(".tar", "_stats.json")).write_text(json.dumps({"count": 50, "successes": successes}))
        sources = (ShardSource(",".join(alpha)), ShardSource(",".join(beta)))
    loader = train_loader(sources, 50, 16, CONTEXT, 0, 10, True, 0, 0.01)
    alpha_token = SimpleTokenizer()("caption alpha0x0")[0, 2].item()  # the first BPE piece of the key
    rows = torch.cat([batch.tokens for batch in itertools.islice(loader, 8)])
    assert 0.65 < (rows[:, 2] == alpha_token).float().mean().item() < 0.85


def test_epoch_shuffled_training_needs_a_shard_per_worker(tmp_path):
    shard = _captioned_shards(tmp_path / "set", [4])[0]
    with pytest.raises(LimoeError, match="fewer than ranks x workers"):
        train_loader((ShardSource(shard),), 2, 16, CONTEXT, 2, 10, False, 0, 0.01)


# ---------------------------------------------------------------------------------------------
# The shipped demo shards


@pytest.mark.parametrize("split, shards, samples, classes", [
    ("train", 7, 3439, None), ("heldout", 2, 343, None), ("heldout_cls", 2, 331, 69), ("train_cls", 2, 371, 32),
])
def test_demo_shards_load_with_the_documented_counts(split, shards, samples, classes):
    spec = str(DEMO / split)
    assert len(expand_shards(spec)) == shards
    classification = classes is not None
    loader = eval_loader(spec, 256, 64, CONTEXT, workers=2, classification=classification)
    batches = list(loader)
    assert sum(len(batch.keys) for batch in batches) == samples
    assert loader.bad_samples.bad == {}
    assert batches[0].images.shape[1:] == (3, 64, 64)
    if classification:
        assert len(read_classnames(spec)) == classes
        assert max(batch.labels.max().item() for batch in batches) < classes
    else:
        assert batches[0].tokens.shape[1] == CONTEXT


# ---------------------------------------------------------------------------------------------
# Inputs that give nothing, images too large to decode safely, batches too large to hold


@pytest.mark.parametrize("workers", [0, 1])
def test_training_on_an_empty_shard_is_one_line_not_a_hang(tmp_path, workers):
    empty = _write_shard(tmp_path / "empty.tar", [])  # a valid tar without a single member
    loader = train_loader((ShardSource(empty),), 2, 16, CONTEXT, workers, 10, True, 0, 0.01)
    with pytest.raises(LimoeError, match=rf"read {EMPTY_SHARDS_IN_A_ROW} shards in a row without a single sample "
                                         rf"\(the last was .*empty\.tar\)"):
        next(iter(loader))


def test_an_empty_source_among_good_ones_is_named(tmp_path):
    good = _captioned_shards(tmp_path / "good", [4])[0]
    empty = _write_shard(tmp_path / "empty.tar", [])
    loader = train_loader((ShardSource(good), ShardSource(empty)), 2, 16, CONTEXT, 0, 0, False, 0, 0.01)
    with pytest.raises(LimoeError, match=r"empty\.tar"):
        list(itertools.islice(loader, 10_000))


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_beyond_the_size_bounds_are_skipped_before_decoding(tmp_path, monkeypatch):
    """A 60000×1 sliver (a few hundred bytes) and an 8193² image are counted, never decoded."""
    decoded = []
    monkeypatch.setattr(images, "to_rgb", lambda image: decoded.append(image.size) or image.convert("RGB"))
    shard = _write_shard(tmp_path / "bounds.tar", [
        _good("fine"),
        {"__key__": "sliver", "png": _png((60_000, 1)), "txt": "a sliver"},
        {"__key__": "tall", "png": _png((10, 10 * images.MAX_ASPECT_RATIO + 1)), "txt": "too tall"},
        {"__key__": "huge", "png": _png((8193, 8193), "1"), "txt": "too many pixels"},
        {"__key__": "panorama", "png": _png((images.MAX_ASPECT_RATIO * 10, 10)), "txt": "wide but within bounds"},
    ])
    loader = eval_loader(shard, 8, 16, CONTEXT, 0, max_bad_fraction=1.0)
    assert sorted(key for batch in loader for key in batch.keys) == ["fine", "panorama"]
    assert loader.bad_samples.bad == {"image_aspect_ratio": 2, "image_too_large": 1}
    assert sorted(decoded) == [(24, 20), (images.MAX_ASPECT_RATIO * 10, 10)]


AT_224 = load_model_config("limoe-tiny", ["image_size=224"])


def _pairs(size: int) -> list[LocalBatch]:
    return [LocalBatch("train.batch_size", size, "image")]


@pytest.fixture
def host_of_gib(monkeypatch):
    """`host_of_gib(n)`: this process alone on a machine of n GiB."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    return lambda gib: monkeypatch.setattr(os, "sysconf", {"SC_PAGE_SIZE": 4096,
                                                           "SC_PHYS_PAGES": gib * 2**30 // 4096}.__getitem__)


def test_a_batch_that_cannot_fit_in_host_memory_is_refused():
    with pytest.raises(LimoeError, match=r"train.batch_size gives 1000000000000000000000 pairs per process, whose "
                                         r"images alone need .* GiB of host memory"):
        check_batch_fits_in_memory(_pairs(10**21), AT_224, 2)
    check_batch_fits_in_memory(_pairs(256), AT_224, 8)  # a real per-GPU batch: 16384 pairs over 64 GPUs, 0.65 GiB


def test_uncropped_batches_are_counted_at_the_largest_region_they_carry(host_of_gib):
    """At 224 px, boxes are at most 4/3 x 2 x 273 = 728 px a side: 16384 pairs with two workers
    (6 batches in flight) need 6 x 16384 x 3 x 224^2 B = 13.8 GiB cropped in the worker, and
    6 x 16384 x 3 x 728^2 B = 145.6 GiB uncropped, more than 64 GiB."""
    host_of_gib(64)
    check_batch_fits_in_memory(_pairs(16384), AT_224, 2, "worker")
    with pytest.raises(LimoeError, match=r"need 146 GiB of host memory \(6 batches in flight with data.workers 2, "
                                         r"x 1 processes on this machine, uncropped for data.resize_on device\)"):
        check_batch_fits_in_memory(_pairs(16384), AT_224, 2, "device")


def test_an_audio_task_is_sized_by_its_clips_samples_and_every_tasks_loader_counts(host_of_gib):
    """limoe-tiny with audio: a 64 px image is 3 x 64^2 = 12288 B, an 8 s clip at 16 kHz 128000
    float32 samples = 512000 B. Tasks of 16384 pairs each, two workers (6 batches in flight per
    loader, both loaders reading at once): 6 x 16384 x (12288 + 512000) B = 6 x 2^33 B = 48 GiB:
    a 48 GiB machine holds them, a 47 GiB one does not; counted as images, the clips would take
    1.1 GiB."""
    config = load_model_config("limoe-tiny", ["modalities=[image, text, audio]"])
    tasks = [LocalBatch("task 'pairs' (train.batch_size)", 16384, "image"),
             LocalBatch("task 'sounds' (tasks[].batch_size)", 16384, "audio")]
    host_of_gib(48)
    check_batch_fits_in_memory(tasks, config, 2)
    host_of_gib(47)
    with pytest.raises(LimoeError) as refusal:
        check_batch_fits_in_memory(tasks, config, 2)
    assert str(refusal.value) == (
        "task 'pairs' (train.batch_size) gives 16384 pairs per process, task 'sounds' (tasks[].batch_size) gives 16384 "
        "pairs per process, whose clips and images alone need 48 GiB of host memory (6 batches in flight per loader "
        "with data.workers 2, x 1 processes on this machine), more than its 47 GiB; lower task 'pairs' "
        "(train.batch_size) or task 'sounds' (tasks[].batch_size) or spread them over more machines.")
    check_batch_fits_in_memory(tasks[1:], config, 2, "device")  # 24 GiB of clips: the image placement leaves them be


def test_video_batches_are_counted_at_their_frames_a_clip(host_of_gib):
    """16 frames a clip at 224 px, two workers: 6 x 1024 x 16 x 3 x 224^2 B = 13.8 GiB, more than
    8 GiB; the same number of images needs 0.86 GiB. Clips are cropped in the worker, so
    resize_on device does not change their count."""
    config = load_model_config("limoe-tiny", ["modalities=[image, text, video]", "image_size=224",
                                              "video.frames=16"])
    host_of_gib(8)
    check_batch_fits_in_memory([LocalBatch("train.batch_size", 1024, "image")], config, 2)
    for resize_on in ("worker", "device"):
        with pytest.raises(LimoeError, match=r"1024 pairs per process, whose clips alone need 13.8 GiB of host memory "
                                             r"\(6 batches in flight with data.workers 2, x 1 processes on this "
                                             r"machine\)"):
            check_batch_fits_in_memory([LocalBatch("train.batch_size", 1024, "video")], config, 2, resize_on)


def test_a_shard_path_with_spaces_is_one_path_and_errors_name_it_in_full(tmp_path):
    shards = _captioned_shards(tmp_path / "my shards", [1, 1])
    assert expand_shards(str(tmp_path / "my shards")) == shards
    assert expand_shards(shards[1]) == [shards[1]]
    missing = str(tmp_path / "my shards" / "00009.tar")
    with pytest.raises(LimoeError, match=re.escape(f"in the shard spec {missing!r}")):
        expand_shards(missing)


def test_a_negative_or_unreadable_class_label_is_a_bad_label(tmp_path):
    jpeg = _image_bytes(0)
    shard = _write_shard(tmp_path / "labels.tar", [{"__key__": "ok", "jpg": jpeg, "cls": b"3"},
                                                    {"__key__": "negative", "jpg": jpeg, "cls": b"-1"},
                                                    {"__key__": "word", "jpg": jpeg, "cls": b"three"}])
    loader = eval_loader(shard, 4, 16, CONTEXT, 0, classification=True, max_bad_fraction=1.0)
    assert [(key, int(label)) for batch in loader for key, label in zip(batch.keys, batch.labels)] == [("ok", 3)]
    assert loader.bad_samples.bad == {"bad_label": 2}


def _source_files(split: str) -> set[str]:
    """The emoji (source file names, code points) of a demo split, from each sample's .json."""
    files = set()
    for shard in expand_shards(str(DEMO / split)):
        with tarfile.open(shard) as archive:
            files |= {Path(json.load(archive.extractfile(m))["file"]).name for m in archive if m.name.endswith(".json")}
    return files


def test_the_training_classification_set_shares_no_class_and_no_image_with_the_heldout_one():
    assert not set(read_classnames(str(DEMO / "train_cls"))) & set(read_classnames(str(DEMO / "heldout_cls")))
    train_cls, heldout = _source_files("train_cls"), _source_files("heldout") | _source_files("heldout_cls")
    assert len(train_cls) == 371 and not train_cls & heldout
    assert train_cls <= _source_files("train")  # labelled training emoji, the same pictures as the pairs
