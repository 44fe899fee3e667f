"""Audio shards through the loaders: clips equal to `decode_clip` of the same members (the centre
window in evaluation, some window of the clip in training), captions from the `.json` list (drawn in
training, the first in evaluation), labels from `.cls`, and bad clips counted by reason."""

import collections
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from limoe.config import ShardSource
from limoe.data.audio import decode_clip
from limoe.data.pipeline import eval_loader, train_loader
from limoe.errors import LimoeError

DEMO = Path(__file__).resolve().parents[2] / "data_shards"
CONTEXT = 16
RATE = 16_000


def _members(folder: Path) -> dict[str, dict]:
    """The samples of a shard folder by key, read by webdataset itself."""
    shards = sorted(str(p) for p in folder.iterdir() if ".tar" in p.name)
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)}


def _encoded(waveform: np.ndarray, format: str = "FLAC", subtype: str = "PCM_16", rate: int = RATE) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, waveform, rate, format=format, subtype=subtype)
    return out.getvalue()


def _tone(index: int, seconds: float = 0.23) -> np.ndarray:
    """A different tone for every index, so that each clip tells which sample it came from."""
    t = np.arange(round(RATE * seconds)) / RATE
    return (0.5 * np.sin(2 * np.pi * (220 + 37 * index) * t)).astype(np.float32)


def _write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _audio_train(folder: Path, batch_size: int, seconds: float, seed: int = 0, **kwargs):
    return train_loader((ShardSource(str(folder)),), batch_size, 0, CONTEXT, 0, 50, True, seed,
                        kwargs.pop("max_bad_fraction", 0.01), modality="audio", sample_rate=RATE,
                        clip_seconds=seconds, **kwargs)


@pytest.fixture(scope="module")
def heldout() -> dict[str, dict]:
    return _members(DEMO / "audio_heldout")


@pytest.mark.parametrize("rate, seconds", [(16_000, 1.0), (11_025, 0.37)])
def test_eval_clips_are_the_centre_windows_decode_clip_gives(heldout, rate, seconds):
    loader = eval_loader(str(DEMO / "audio_heldout"), 9, 0, CONTEXT, 0, modality="audio", sample_rate=rate,
                         clip_seconds=seconds)
    batches = list(loader)
    assert [len(batch.keys) for batch in batches] == [9] * 7 + [1]
    tokenize = SimpleTokenizer(context_length=CONTEXT)
    for batch in batches:
        assert batch.images.dtype == torch.float32 and batch.images.shape == (len(batch.keys), round(rate * seconds))
        for key, clip, tokens in zip(batch.keys, batch.images, batch.tokens):
            expected = decode_clip(heldout[key]["flac"], rate, seconds, "centre")
            assert torch.equal(clip, torch.from_numpy(expected)), key
            first = json.loads(heldout[key]["json"])["text"][0]
            assert torch.equal(tokens, tokenize([first])[0])
    assert loader.bad_samples.summary() == "0 of 64 samples skipped (none)"


def test_eval_labels_are_the_cls_members(heldout):
    loader = eval_loader(str(DEMO / "audio_heldout"), 13, 0, CONTEXT, 0, classification=True, modality="audio",
                         sample_rate=RATE, clip_seconds=1.0)
    labels = {key: int(label) for batch in loader for key, label in zip(batch.keys, batch.labels)}
    assert labels == {key: int(sample["cls"]) for key, sample in heldout.items()}


def test_training_clips_are_random_windows_of_the_shipped_clips():
    members = _members(DEMO / "audio_train")
    full = np.stack([soundfile.read(io.BytesIO(s["flac"]), dtype="float32")[0] for s in members.values()])  # [N, 16000]
    seconds = 0.37
    batches = list(itertools.islice(_audio_train(DEMO / "audio_train", 7, seconds), 4))
    assert all(batch.images.shape == (7, round(RATE * seconds)) and batch.images.dtype == torch.float32
               for batch in batches)
    starts = set()
    for clip in (row.numpy() for batch in batches for row in batch.images):
        head = np.ones(full[:, :-len(clip) + 1].shape, dtype=bool)
        for offset in range(8):  # candidate windows: where the clip's first samples occur
            head &= full[:, offset:full.shape[1] - len(clip) + 1 + offset] == clip[offset]
        found = [(n, start) for n, start in zip(*np.nonzero(head)) if np.array_equal(full[n, start:start + len(clip)], clip)]
        assert found, "a training clip that is no window of any shipped clip"
        starts.add(found[0][1])
    assert len(starts) > 5


def test_training_draws_are_seeded():
    def first(seed):
        return list(itertools.islice(_audio_train(DEMO / "audio_train", 5, 0.41, seed=seed), 3))

    same, again, other = first(3), first(3), first(4)
    assert all(torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) for a, b in zip(same, again))
    assert not all(torch.equal(a.images, b.images) for a, b in zip(same, other))


def test_training_draws_every_listed_caption_and_evaluation_takes_the_first(tmp_path):
    lists = {f"k{i}": [f"clip {i} caption {c}" for c in "abc"] for i in range(5)}
    lists["k2"] = ["", "  clip 2 only  "]  # empty entries are passed over
    samples = [{"__key__": key, "flac": _encoded(_tone(i)), "json": json.dumps({"text": text, "tag": ["x"]})}
               for i, (key, text) in enumerate(lists.items())]
    samples.append({"__key__": "k5", "flac": _encoded(_tone(5)), "json": json.dumps({"text": "clip 5 a string"})})
    samples.append({"__key__": "k6", "flac": _encoded(_tone(6)), "txt": "clip 6 from txt",
                    "json": json.dumps({"text": ["clip 6 not this"]})})
    _write_shard(tmp_path / "00000.tar", samples)
    tokenize = SimpleTokenizer(context_length=CONTEXT)
    listed = {**lists, "k5": ["clip 5 a string"], "k6": ["clip 6 from txt"]}
    owner = {tuple(tokenize([caption.strip()])[0].tolist()): (key, caption.strip())
             for key, captions in listed.items() for caption in captions if caption.strip()}

    drawn = collections.defaultdict(set)
    for batch in itertools.islice(_audio_train(tmp_path, 5, 0.1), 30):
        for tokens in batch.tokens:
            key, caption = owner[tuple(tokens.tolist())]  # KeyError: a caption from no list
            drawn[key].add(caption)
    assert all(len(drawn[f"k{i}"]) == 3 for i in (0, 1, 3, 4))
    assert drawn["k2"] == {"clip 2 only"} and drawn["k5"] == {"clip 5 a string"} and drawn["k6"] == {"clip 6 from txt"}

    loader = eval_loader(str(tmp_path), 4, 0, CONTEXT, 0, modality="audio", sample_rate=RATE, clip_seconds=0.1)
    firsts = {key: owner[tuple(tokens.tolist())][1] for batch in loader for key, tokens in zip(batch.keys, batch.tokens)}
    assert firsts == {**{key: captions[0] for key, captions in lists.items()}, "k2": "clip 2 only",
                      "k5": "clip 5 a string", "k6": "clip 6 from txt"}


def _shard_with_bad_clips(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    good = {f"g{i}": _tone(i, 0.17) for i in range(5)}
    samples = [{"__key__": key, "flac": _encoded(wave), "json": json.dumps({"text": [f"tone {key}"]})}
               for key, wave in good.items()]
    samples[1]["wav"] = _encoded(_tone(9, 0.17), "WAV", "FLOAT")  # flac comes first in the preference order
    samples[3] = {"__key__": "g3", "ogg": _encoded(good["g3"], "OGG", "VORBIS"), "txt": "tone g3"}
    nan = np.array([0.1, np.nan, 0.2] * 100, dtype=np.float32)
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    bad = [
        {"__key__": "corrupt", "flac": b"fLaC" + bytes(range(256)) * 3, "txt": "corrupt"},
        {"__key__": "truncated", "flac": samples[0]["flac"][:30], "txt": "cut short"},
        {"__key__": "empty", "wav": _encoded(np.zeros(0, dtype=np.float32), "WAV", "FLOAT"), "txt": "no frames"},
        {"__key__": "nan", "wav": _encoded(nan, "WAV", "FLOAT"), "txt": "not a number"},
        {"__key__": "uncaptioned", "flac": _encoded(_tone(7)), "json": json.dumps({"tag": ["no text"]})},
        {"__key__": "picture", "png": image.getvalue(), "txt": "an image in an audio set"},
    ]
    return _write_shard(path, samples[:3] + bad + samples[3:]), good


BAD = {"bad_audio": 2, "empty_audio": 1, "nonfinite_audio": 1, "no_caption": 1, "no_audio": 1}


def test_bad_clips_are_counted_by_reason_and_the_rest_arrive(tmp_path):
    shard, good = _shard_with_bad_clips(tmp_path / "faulty.tar")
    loader = eval_loader(shard, 3, 0, CONTEXT, 2, max_bad_fraction=1.0, modality="audio", sample_rate=RATE,
                         clip_seconds=0.2)
    clips = {key: clip for batch in loader for key, clip in zip(batch.keys, batch.images)}
    assert sorted(clips) == sorted(good)
    for key in ("g0", "g1", "g2", "g4"):  # lossless: the tone itself, zero-padded from 0.17 s to 0.2 s
        expected = np.pad(good[key], (0, round(RATE * 0.2) - len(good[key])))
        np.testing.assert_allclose(clips[key].numpy(), expected, atol=1 / 2**15)
    assert loader.bad_samples.bad == BAD and loader.bad_samples.seen == 11

    training = _audio_train(tmp_path, 4, 0.1, max_bad_fraction=1.0)
    assert all(batch.images.shape == (4, 1600) for batch in itertools.islice(training, 5))
    assert set(training.bad_samples.bad) == set(BAD)


def test_image_shards_read_as_audio_stop_with_the_reason(tmp_path):
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="JPEG")
    _write_shard(tmp_path / "00000.tar", [{"__key__": f"i{i}", "jpg": image.getvalue(), "txt": "x"} for i in range(8)])
    with pytest.raises(LimoeError, match=r"\(no_audio 5\).*the latest was no_audio at key i\d in shard"):
        next(iter(_audio_train(tmp_path, 2, 0.1, bad_check_after=5)))


@pytest.mark.parametrize("rate, seconds", [(None, 1.0), (16_000, 0), (16_000, None)])
def test_audio_without_a_rate_or_length_is_refused(rate, seconds):
    with pytest.raises(LimoeError, match="model.audio.sample_rate"):
        eval_loader(str(DEMO / "audio_heldout"), 4, 0, CONTEXT, 0, modality="audio", sample_rate=rate,
                    clip_seconds=seconds)
