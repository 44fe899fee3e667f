"""The shipped audio demo shards (data_shards/build_audio_shards.py) are what their README says:
one-second 16 kHz mono clips that decode, two captions each, held-out programs never in training,
and family labels that agree with the captions."""

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds

DEMO = Path(__file__).resolve().parents[2] / "data_shards"


def _samples(folder: str) -> list[dict]:
    shards = sorted(str(p) for p in (DEMO / folder).glob("*.tar.gz"))
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {folder: _samples(folder) for folder in ("audio_train", "audio_heldout")}


def test_every_clip_is_one_second_of_16_khz_mono_below_its_peak(splits):
    for samples in splits.values():
        for sample in samples:
            waveform, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
            assert rate == 16_000 and waveform.shape == (16_000,), sample["__key__"]
            peak = np.abs(waveform).max()
            loud = " loud " in json.loads(sample["json"])["text"][0]
            assert abs(peak - (0.9 if loud else 0.3)) <= 1 / 128, sample["__key__"]  # one 8-bit step


def test_counts_and_captions(splits):
    assert {folder: len(samples) for folder, samples in splits.items()} == {"audio_train": 288, "audio_heldout": 64}
    for samples in splits.values():
        for sample in samples:
            captions = json.loads(sample["json"])["text"]
            assert len(captions) == 2 and captions[0].endswith(("low", "middle", "high"))
            assert captions[0].split(" on ", 1)[1].startswith(("a ", "an "))


def test_held_out_programs_are_never_heard_in_training_and_labels_name_the_family(splits):
    program = {folder: {json.loads(s["json"])["program"] for s in samples} for folder, samples in splits.items()}
    assert not program["audio_train"] & program["audio_heldout"]
    assert len(program["audio_train"] | program["audio_heldout"]) == 128
    classnames = (DEMO / "audio_heldout" / "classnames.txt").read_text().splitlines()
    assert len(classnames) == 16
    labels = Counter()
    for sample in splits["audio_heldout"]:
        family = classnames[int(sample["cls"])]
        labels[family] += 1
        assert json.loads(sample["json"])["text"][1].endswith(f", {family}")
    assert labels == {family: 4 for family in classnames}  # two programs of each family, two clips each
