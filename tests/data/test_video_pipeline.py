"""Video shards through the loaders and `limoe shards build --video`: batches of [B, T, 3, S, S]
clips equal to decoding and cropping the same members directly (normalised in evaluation, uint8
in training), captions from the `.json` list, labels from `.cls`, bad clips counted by reason, and
clips stored by the build byte for byte as they were."""

import io
import itertools
import sys
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from limoe.config import ShardSource
from limoe.data.pipeline import eval_loader, train_loader
from limoe.data.preprocess import normalize
from limoe.data.crops import crop_clip
from limoe.data.video import decode_frames
from limoe.errors import LimoeError
from tests.helpers import filmstrip_bytes, frame_indices_shown, refused, run_limoe, video_bytes

DEMO = Path(__file__).resolve().parents[2] / "data_shards"
CONTEXT = 16


def _members(folder: Path) -> dict[str, dict]:
    shards = sorted(str(p) for p in folder.iterdir() if ".tar" in p.name)
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)}


def _video_train(folder: Path, batch_size: int, frames: int, stride: int, size: int, seed: int = 0, **kwargs):
    return train_loader((ShardSource(str(folder)),), batch_size, size, CONTEXT, 0, 50, True, seed,
                        kwargs.pop("max_bad_fraction", 0.01), modality="video", frames=frames, frame_stride=stride,
                        **kwargs)


def test_eval_batches_are_the_centre_windows_cropped_and_normalised():
    members = _members(DEMO / "video_heldout")
    loader = eval_loader(str(DEMO / "video_heldout"), 25, 19, CONTEXT, 0, classification=True, modality="video",
                         frames=3, frame_stride=3)
    batches = list(loader)
    assert [len(batch.keys) for batch in batches] == [25] * 7 + [17]
    for batch in batches:
        assert batch.images.shape == (len(batch.keys), 3, 3, 19, 19) and batch.images.dtype == torch.float32
        for key, clip, label in zip(batch.keys, batch.images, batch.labels):
            frames = crop_clip(decode_frames(members[key]["png"], 3, 3, "centre"), 19, train=False)  # [T, 3, S, S]
            assert torch.equal(clip, normalize(torch.from_numpy(frames))), key  # as images [B, 3, S, S] are
            assert label == int(members[key]["cls"])
    assert loader.bad_samples.summary() == "0 of 192 samples skipped (none)"


def test_eval_captions_are_the_json_text():
    members = _members(DEMO / "video_heldout")
    loader = eval_loader(str(DEMO / "video_heldout"), 64, 16, CONTEXT, 0, modality="video", frames=8, frame_stride=1)
    tokenize = SimpleTokenizer(context_length=CONTEXT)
    for batch in loader:
        assert batch.labels is None and batch.images.shape[1:] == (8, 3, 16, 16)
        expected = tokenize([json.loads(members[key]["json"])["text"][0] for key in batch.keys])
        assert torch.equal(batch.tokens, expected)


def test_training_batches_are_uint8_clips_and_seeded():
    def first(seed):
        torch.manual_seed(0)  # with no workers the crop boxes come from the main process's generator, as images'
        return list(itertools.islice(_video_train(DEMO / "video_train", 6, 4, 2, 23, seed=seed), 3))

    same, again, other = first(1), first(1), first(2)
    for batch in same:
        assert batch.images.shape == (6, 4, 3, 23, 23) and batch.images.dtype == torch.uint8
        assert batch.tokens.shape == (6, CONTEXT)
    assert all(torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) for a, b in zip(same, again))
    assert not all(torch.equal(a.images, b.images) for a, b in zip(same, other))


def test_training_windows_are_stride_apart_within_the_clip(tmp_path):
    with wds.TarWriter(str(tmp_path / "00000.tar")) as writer:
        for key in ("a", "b", "c"):
            writer.write({"__key__": key, "png": filmstrip_bytes(12, 9), "txt": f"clip {key}"})
    starts = set()
    for batch in itertools.islice(_video_train(tmp_path, 3, 3, 4, 9), 10):
        for clip in batch.images.numpy():
            shown = frame_indices_shown(clip)
            assert shown == [shown[0], shown[0] + 4, shown[0] + 8]
            starts.add(shown[0])
    assert starts == {0, 1, 2, 3}  # every window of span 9 in 12 frames


def _shard_with_bad_clips(path: Path) -> str:
    good = [{"__key__": f"g{i}", "png": filmstrip_bytes(5, 8), "json": json.dumps({"text": [f"clip {i}"]})}
            for i in range(4)]
    good[1] = {"__key__": "g1", "mp4": video_bytes(5), "png": b"not read: mp4 comes first", "txt": "clip 1"}
    bad = [
        {"__key__": "corrupt", "mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 2, "txt": "corrupt"},
        {"__key__": "cut", "webm": video_bytes(6, codec="libvpx-vp9", format="webm")[:150], "txt": "cut short"},
        {"__key__": "tall", "png": _tall_png(), "txt": "narrower than high"},
        {"__key__": "uncaptioned", "png": filmstrip_bytes(3, 8), "json": json.dumps({"tag": ["no text"]})},
        {"__key__": "sound", "flac": b"fLaC", "txt": "audio in a video set"},
    ]
    with wds.TarWriter(str(path)) as writer:
        for sample in good[:2] + bad + good[2:]:
            writer.write(sample)
    return str(path)


def _tall_png() -> bytes:
    """A strip narrower than it is high: not one square frame."""
    out = io.BytesIO()
    Image.new("RGB", (7, 8)).save(out, format="PNG")
    return out.getvalue()


BAD = {"bad_video": 2, "empty_video": 1, "no_caption": 1, "no_video": 1}


def test_bad_clips_are_counted_by_reason_and_the_rest_arrive(tmp_path):
    shard = _shard_with_bad_clips(tmp_path / "faulty.tar")
    loader = eval_loader(shard, 3, 8, CONTEXT, 2, max_bad_fraction=1.0, modality="video", frames=2, frame_stride=2)
    clips = {key: clip for batch in loader for key, clip in zip(batch.keys, batch.images)}
    assert sorted(clips) == ["g0", "g1", "g2", "g3"]
    assert loader.bad_samples.bad == BAD and loader.bad_samples.seen == 9

    training = _video_train(tmp_path, 2, 2, 1, 8, max_bad_fraction=1.0)
    assert all(batch.images.shape == (2, 2, 3, 8, 8) for batch in itertools.islice(training, 4))
    assert set(training.bad_samples.bad) == set(BAD)


@pytest.mark.parametrize("frames, stride", [(None, 1), (4, 0), (2.5, 1)])
def test_video_without_a_frame_count_or_stride_is_refused(frames, stride):
    with pytest.raises(LimoeError, match="model.video.frames and model.video.frame_stride"):
        eval_loader(str(DEMO / "video_heldout"), 4, 16, CONTEXT, 0, modality="video", frames=frames,
                    frame_stride=stride)


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    stored = {"a.mp4": video_bytes(7), "sub/b.png": filmstrip_bytes(4, 10), "c.jpg": filmstrip_bytes(3, 12, format="JPEG")}
    for name, data in stored.items():
        (folder / name).write_bytes(data)
    (folder / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 and nothing else")
    captions = tmp_path / "captions.csv"
    captions.write_text("file,caption\na.mp4,a grey fade\nb.png,four frames\na.mp4,darker to lighter\n"
                        "c.jpg,three\nbroken.webm,unreadable\n")
    return folder, captions, stored


def test_video_build_stores_clips_as_they_are_with_caption_lists(clips, tmp_path):
    folder, captions, stored = clips
    out = run_limoe(["shards", "build", "--video", str(folder), "--captions", str(captions), "--output",
                     str(tmp_path / "out"), "--maxcount", "2"])
    assert out.split() == ["samples=3", "shards=2", "unreadable_videos=1", "captions_without_video=0",
                           "empty_captions=0", "uncaptioned_videos=0"]
    got = {}
    for sample in _members(tmp_path / "out").values():
        meta = json.loads(sample["json"])
        (extension,) = set(sample) & {"mp4", "png", "jpg"}
        got[meta["file"]] = (extension, sample[extension], meta["text"], meta["frames"], meta["width"])
    assert got == {"a.mp4": ("mp4", stored["a.mp4"], ["a grey fade", "darker to lighter"], 7, 34),
                   "c.jpg": ("jpg", stored["c.jpg"], ["three"], 3, 12),
                   "sub/b.png": ("png", stored["sub/b.png"], ["four frames"], 4, 10)}
    loader = eval_loader(str(tmp_path / "out"), 2, 8, CONTEXT, 0, modality="video", frames=3, frame_stride=1)
    assert sum(len(batch.keys) for batch in loader) == 3 and loader.bad_samples.bad == {}


@pytest.mark.parametrize("extra, message", [
    (["--image-size", "64"], "--image-size resizes images, and video is stored as it is"),
    (["--audio", "{folder}"], "not allowed with argument"),
])
def test_bad_video_builds_are_one_line_and_exit_2(clips, tmp_path, extra, message):
    folder, captions, _ = clips
    refused(["shards", "build", "--video", str(folder), "--captions", str(captions), "--output", str(tmp_path / "out"),
             *[item.format(folder=folder) for item in extra]], message)
    assert not list(tmp_path.rglob("*.tar"))


def test_video_files_without_pyav_stop_before_any_worker_starts(clips, tmp_path, monkeypatch):
    folder, captions, _ = clips
    run_limoe(["shards", "build", "--video", str(folder), "--captions", str(captions), "--output", str(tmp_path / "out")])
    monkeypatch.setitem(sys.modules, "av", None)  # import av then raises ImportError
    with pytest.raises(LimoeError, match=r"^reading mp4 or webm video needs PyAV, which is not installed: pip install av$"):
        eval_loader(str(tmp_path / "out"), 2, 8, CONTEXT, 2, modality="video", frames=2, frame_stride=1)
    with pytest.raises(LimoeError, match="pip install av"):
        _video_train(tmp_path / "out", 2, 2, 1, 8)
    batch = next(iter(_video_train(DEMO / "video_train", 2, 2, 1, 8)))  # filmstrips need no PyAV
    assert batch.images.shape == (2, 2, 3, 8, 8)


def test_video_class_folders_give_labels_and_classnames(tmp_path):
    root = tmp_path / "actions"
    for name, data in {"waving_hand/a.png": filmstrip_bytes(3, 6), "waving_hand/b.mp4": video_bytes(4),
                       "jumping/c.png": filmstrip_bytes(5, 6)}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    out = run_limoe(["shards", "build", "--video", str(root), "--classification", "--output", str(tmp_path / "out")])
    assert out.split() == ["samples=3", "shards=1", "unreadable_videos=0", "classes=2"]
    assert (tmp_path / "out" / "classnames.txt").read_text() == "jumping\nwaving hand\n"
    loader = eval_loader(str(tmp_path / "out"), 2, 6, CONTEXT, 0, classification=True, modality="video", frames=2,
                         frame_stride=2)
    members = _members(tmp_path / "out")
    assert sorted((json.loads(s["json"])["file"], int(s["cls"])) for s in members.values()) == [
        ("jumping/c.png", 0), ("waving_hand/a.png", 1), ("waving_hand/b.mp4", 1)]
    labels = {key: int(label) for batch in loader for key, label in zip(batch.keys, batch.labels)}
    assert labels == {key: int(sample["cls"]) for key, sample in members.items()}
