"""Shard building: captions and class folders in, img2dataset-layout shards out, read back."""

import io
import json
import sys

import numpy as np
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from limoe.cli import main
from limoe.errors import LimoeError
from limoe.data.pipeline import eval_loader
from limoe.data.shards import build_shards


def _image(path, size, mode="RGB", color=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color + (128,)).save(path)


def _read(folder):
    shards = sorted(str(p) for p in folder.iterdir() if ".tar" in p.name)
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def _size(sample):
    return Image.open(io.BytesIO(sample["jpg"])).size


@pytest.fixture
def captioned(tmp_path):
    images = tmp_path / "images"
    _image(images / "a.png", (40, 30))
    _image(images / "sub" / "b.jpg", (20, 50))
    _image(images / "c.webp", (33, 33), mode="RGBA")
    _image(images / "uncaptioned.png", (8, 8))
    captions = tmp_path / "captions.csv"
    captions.write_text(
        "file,caption\n"
        "a.png,a red square\n"
        "sub/b.jpg,  a tall block  \n"
        "c.webp,half transparent\n"
        "missing.jpg,no such image\n"
        "a.png,\n"
    )
    return images, captions


def test_captioned_images_round_trip(captioned, tmp_path):
    images, captions = captioned
    counts = build_shards(images, captions, tmp_path / "out", maxcount=2)
    assert counts == {"samples": 3, "shards": 2, "unreadable_images": 0, "captions_without_image": 1,
                      "empty_captions": 1, "uncaptioned_images": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.tar", "00001.tar"]
    samples = _read(tmp_path / "out")
    assert sorted(samples) == ["000000000", "000000001", "000000002"]
    got = {json.loads(s["json"])["file"]: (s["txt"].decode(), _size(s)) for s in samples.values()}
    assert got == {"a.png": ("a red square", (40, 30)), "c.webp": ("half transparent", (33, 33)),
                   "sub/b.jpg": ("a tall block", (20, 50))}
    transparent = Image.open(io.BytesIO(samples["000000001"]["jpg"])).getpixel((5, 5))
    assert min(transparent) > 100  # composited onto white, not black


def test_resize_center_crops_and_records_the_original_size(captioned, tmp_path):
    images, captions = captioned
    build_shards(images, captions, tmp_path / "out", image_size=16)
    for sample in _read(tmp_path / "out").values():
        meta = json.loads(sample["json"])
        assert _size(sample) == (16, 16) and (meta["width"], meta["height"]) == (16, 16)
        assert (meta["original_width"], meta["original_height"]) != (16, 16)


@pytest.mark.parametrize("name", ["train.csv", "train.tsv"])
def test_open_clip_tab_separated_filepath_title_files(captioned, tmp_path, name):
    """open_clip's CsvDataset layout: tab-separated even when named .csv, full paths, commas in titles."""
    images, _ = captioned
    captions = tmp_path / name
    captions.write_text(f"filepath\ttitle\n{images / 'a.png'}\ta red, square thing\nsub/b.jpg\ta tall block\n")
    build_shards(images, captions, tmp_path / "out")
    assert sorted(s["txt"].decode() for s in _read(tmp_path / "out").values()) == ["a red, square thing", "a tall block"]


def test_jsonl_captions_allow_several_captions_per_image(tmp_path):
    _image(tmp_path / "images" / "x.jpg", (10, 10))
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image": "x.jpg", "text": "one"}\n\n{"image": "x.jpg", "text": "two"}\n')
    build_shards(tmp_path / "images", captions, tmp_path / "out")
    assert sorted(s["txt"].decode() for s in _read(tmp_path / "out").values()) == ["one", "two"]


def test_classification_folders_round_trip_labels_and_classnames(tmp_path):
    root = tmp_path / "folders"
    for synset, count in (("n02085620", 2), ("n01440764", 3)):  # created out of order on purpose
        for i in range(count):
            _image(root / synset / f"{i}.JPEG", (12 + i, 9))
    counts = build_shards(root, None, tmp_path / "out", classification=True)
    assert counts == {"samples": 5, "shards": 1, "unreadable_images": 0, "classes": 2}
    assert (tmp_path / "out" / "classnames.txt").read_text() == "tench\nChihuahua\n"  # ImageNet-1k's names
    labels = {json.loads(s["json"])["file"]: int(s["cls"]) for s in _read(tmp_path / "out").values()}
    assert labels == {"n01440764/0.JPEG": 0, "n01440764/1.JPEG": 0, "n01440764/2.JPEG": 0,
                      "n02085620/0.JPEG": 1, "n02085620/1.JPEG": 1}


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    _image(tmp_path / "images" / "good.png", (8, 8))
    (tmp_path / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    captions = tmp_path / "c.csv"
    captions.write_text("filename,caption\ngood.png,fine\nbad.jpg,broken\n")
    counts = build_shards(tmp_path / "images", captions, tmp_path / "out")
    assert (counts["samples"], counts["unreadable_images"]) == (1, 1)


def test_compressed_builds_are_byte_identical(captioned, tmp_path):
    images, captions = captioned
    first = build_shards(images, captions, tmp_path / "one", compress=True)
    build_shards(images, captions, tmp_path / "two", compress=True)
    assert first["shards"] == 1
    assert (tmp_path / "one" / "00000.tar.gz").read_bytes() == (tmp_path / "two" / "00000.tar.gz").read_bytes()
    assert len(_read(tmp_path / "one")) == 3


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_folder", "does not exist"),
        ("no_match", "no caption"),
        ("bad_columns", "needs one of"),
        ("existing_shards", "already holds shards"),
        ("no_captions", "no captions given"),
        ("empty_classes", "no class folders"),
    ],
)
def test_bad_input_is_a_limoe_error(case, message, tmp_path):
    images = tmp_path / "images"
    _image(images / "a.png", (8, 8))
    captions = tmp_path / "c.csv"
    captions.write_text("file,caption\nother.png,nothing here\n")
    output = tmp_path / "out"
    kwargs = {}
    if case == "missing_folder":
        images = tmp_path / "nope"
    elif case == "bad_columns":
        captions.write_text("path,label\na.png,x\n")
    elif case == "existing_shards":
        captions.write_text("file,caption\na.png,fine\n")
        output.mkdir()
        (output / "00000.tar").write_bytes(b"")
    elif case == "no_captions":
        captions = None
    elif case == "empty_classes":
        captions, kwargs = None, {"classification": True}
    with pytest.raises(LimoeError, match=message):
        build_shards(images, captions, output, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"layout": "clip_benchmark"}, "writes a classification set; add --classification"),
    ({"layout": "clip_benchmark", "classification": True, "compress": True}, "uncompressed test/N.tar shards only"),
])
def test_the_clip_benchmark_layout_is_for_uncompressed_classification_sets(tmp_path, kwargs, message):
    _image(tmp_path / "images" / "cat" / "a.png", (8, 8))
    with pytest.raises(LimoeError, match=message):
        build_shards(tmp_path / "images", None, tmp_path / "out", **kwargs)


def test_a_clip_benchmark_layout_is_not_written_over(tmp_path):
    _image(tmp_path / "images" / "cat" / "a.png", (8, 8))
    build_shards(tmp_path / "images", None, tmp_path / "out", classification=True, layout="clip_benchmark")
    with pytest.raises(LimoeError, match="already holds shards"):
        build_shards(tmp_path / "images", None, tmp_path / "out", classification=True, layout="clip_benchmark")


@pytest.fixture
def twelve_classified(tmp_path):
    for index in range(12):
        _image(tmp_path / "images" / f"class{index % 2}" / f"{index}.png", (8, 8))
    return tmp_path / "images"


def test_progress_off_a_terminal_is_a_line_at_each_tenth(twelve_classified, tmp_path, capsys):
    build_shards(twelve_classified, None, tmp_path / "quiet", classification=True)
    assert "shards build:" not in capsys.readouterr().err
    build_shards(twelve_classified, None, tmp_path / "out", classification=True, progress=True)
    lines = capsys.readouterr().err.splitlines()  # [the warning that the folders name the classes,] progress
    assert [line for line in lines if not line.startswith("limoe: warning:")] == [
        f"shards build: read {read} of 12 samples" for read in (2, 4, 6, 8, 10, 12)]


def test_progress_on_a_terminal_is_a_bar(twelve_classified, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    build_shards(twelve_classified, None, tmp_path / "out", classification=True, progress=True)
    err = capsys.readouterr().err
    assert "samples: 100%" in err and "12/12" in err and "shards build:" not in err


# ---------------------------------------------------------------------------------------------
# Audio: LAION-CLAP's layout, the files' bytes as they are


def _audio(path, seconds, frequency=440.0, rate=16_000, format="FLAC", subtype="PCM_16"):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(rate * seconds)) / rate
    soundfile.write(path, 0.4 * np.sin(2 * np.pi * frequency * t), rate, format=format, subtype=subtype)
    return path.read_bytes()


@pytest.fixture
def sounds(tmp_path):
    folder = tmp_path / "sounds"
    stored = {"a.flac": _audio(folder / "a.flac", 0.3),
              "sub/b.wav": _audio(folder / "sub" / "b.wav", 0.21, 660, format="WAV"),
              "c.OGG": _audio(folder / "c.OGG", 0.5, 330, 22_050, "OGG", "VORBIS")}
    (folder / "broken.flac").write_bytes(b"fLaC but nothing else")
    (folder / "notes.txt").write_text("not audio")
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"file": "a.flac", "caption": "a tone"}\n{"file": "b.wav", "caption": "a higher tone"}\n'
                        '{"file": "a.flac", "caption": "  the same tone  "}\n{"file": "c.OGG", "caption": "lower"}\n'
                        '{"file": "broken.flac", "caption": "unreadable"}\n{"file": "gone.mp3", "caption": "x"}\n')
    return folder, captions, stored


def test_audio_round_trips_bytes_and_caption_lists(sounds, tmp_path, capsys):
    folder, captions, stored = sounds
    assert main(["shards", "build", "--audio", str(folder), "--captions", str(captions), "--output",
                 str(tmp_path / "out"), "--maxcount", "2"]) == 0
    assert capsys.readouterr().out.split() == ["samples=3", "shards=2", "unreadable_audio=1", "captions_without_audio=1",
                                               "empty_captions=0", "uncaptioned_audio=0"]
    samples = _read(tmp_path / "out")
    got = {}
    for sample in samples.values():
        meta = json.loads(sample["json"])
        (extension,) = set(sample) & {"flac", "wav", "ogg"}
        got[meta["file"]] = (extension, sample[extension], meta["text"])
    assert got == {"a.flac": ("flac", stored["a.flac"], ["a tone", "the same tone"]),
                   "c.OGG": ("ogg", stored["c.OGG"], ["lower"]),
                   "sub/b.wav": ("wav", stored["sub/b.wav"], ["a higher tone"])}
    loader = eval_loader(str(tmp_path / "out"), 2, 0, 8, 0, modality="audio", sample_rate=8_000, clip_seconds=0.25)
    assert sum(len(batch.keys) for batch in loader) == 3 and loader.bad_samples.bad == {}

    build_shards(folder, captions, tmp_path / "again", maxcount=2, modality="audio")
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_audio_class_folders_give_labels_and_classnames(tmp_path):
    root = tmp_path / "folders"
    _audio(root / "wood_block" / "1.wav", 0.1, format="WAV")
    _audio(root / "bird_song" / "x.flac", 0.1)
    _audio(root / "bird_song" / "y.flac", 0.2)
    counts = build_shards(root, None, tmp_path / "out", classification=True, modality="audio")
    assert counts == {"samples": 3, "shards": 1, "unreadable_audio": 0, "classes": 2}
    assert (tmp_path / "out" / "classnames.txt").read_text() == "bird song\nwood block\n"
    samples = _read(tmp_path / "out")
    assert {json.loads(s["json"])["file"]: int(s["cls"]) for s in samples.values()} == {
        "bird_song/x.flac": 0, "bird_song/y.flac": 0, "wood_block/1.wav": 1}
    loader = eval_loader(str(tmp_path / "out"), 2, 0, 8, 0, classification=True, modality="audio",
                         sample_rate=16_000, clip_seconds=0.1)
    assert sorted(label for batch in loader for label in batch.labels.tolist()) == [0, 0, 1]


@pytest.mark.parametrize("extra, message", [
    (["--image-size", "64"], "--image-size resizes images"),
    (["--images", "{folder}"], "not allowed with argument"),
    (["--classification", "--layout", "clip_benchmark"], "clip_benchmark holds images"),
])
def test_bad_audio_builds_are_one_line_and_exit_2(sounds, tmp_path, capsys, extra, message):
    folder, captions, _ = sounds
    arguments = ["shards", "build", "--audio", str(folder), "--output", str(tmp_path / "out")]
    arguments += [] if "--classification" in extra else ["--captions", str(captions)]
    assert main(arguments + [item.format(folder=folder) for item in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_missing_audio_folder_names_the_option(tmp_path, capsys):
    captions = tmp_path / "c.csv"
    captions.write_text("file,caption\na.flac,x\n")
    assert main(["shards", "build", "--audio", str(tmp_path / "nope"), "--captions", str(captions), "--output",
                 str(tmp_path / "out")]) == 2
    assert f"audio folder {tmp_path / 'nope'} does not exist; check the --audio path." in capsys.readouterr().err
