"""The shipped video demo shards (data_shards/build_video_shards.py) are what their README says:
8-frame 32 px filmstrips in which the sprite moves as the caption says, held-out sprite-direction
pairs never in training, direction labels that agree with the captions, and clips that the
builder makes again byte for byte."""

import importlib.util
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

DEMO = Path(__file__).resolve().parents[2] / "data_shards"
STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (x, y) per pixel of speed
SPEED = {"slow": 1, "fast": 2}


def _samples(folder: str) -> list[dict]:
    shards = sorted(str(p) for p in (DEMO / folder).glob("*.tar.gz"))
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {folder: _samples(folder) for folder in ("video_train", "video_heldout")}


def _centres(strip: Image.Image) -> list[np.ndarray]:
    """Per frame, the (x, y) centre of the pixels that differ from the background (the strip's commonest colour)."""
    indices = np.asarray(strip).reshape(32, 8, 32).transpose(1, 0, 2)  # [frame, y, x] palette indices
    background = np.bincount(indices.ravel()).argmax()
    centres = []
    for frame in indices:
        ys, xs = np.nonzero(frame != background)
        centres.append(np.array([xs.mean(), ys.mean()]))
    return centres


def test_counts_layout_and_motion_as_captioned(splits):
    assert {folder: len(samples) for folder, samples in splits.items()} == {"video_train": 720, "video_heldout": 192}
    for samples in splits.values():
        for sample in samples:
            strip = Image.open(io.BytesIO(sample["png"]))
            assert strip.size == (256, 32) and strip.mode == "P", sample["__key__"]
            meta = json.loads(sample["json"])
            (caption,) = meta["text"]
            assert caption.endswith(f" {meta['sprite']} moving {meta['direction']}, {meta['speed']}")
            step = np.array(STEPS[meta["direction"]]) * SPEED[meta["speed"]]
            centres = _centres(strip)
            for before, after in zip(centres, centres[1:]):
                np.testing.assert_allclose(after - before, step, atol=1e-9, err_msg=sample["__key__"])


def test_held_out_pairs_are_never_in_training_and_labels_name_the_direction(splits):
    pairs = {folder: {(json.loads(s["json"])["sprite"], json.loads(s["json"])["direction"]) for s in samples}
             for folder, samples in splits.items()}
    assert not pairs["video_train"] & pairs["video_heldout"]
    sprites = {sprite for sprite, _ in pairs["video_train"]}
    assert len(sprites) == 12 and {sprite for sprite, _ in pairs["video_heldout"]} == sprites
    assert Counter(direction for _, direction in pairs["video_heldout"]) == {d: 3 for d in STEPS}
    classnames = (DEMO / "video_heldout" / "classnames.txt").read_text().splitlines()
    assert classnames == [f"moving {direction}" for direction in STEPS]
    for sample in splits["video_heldout"]:
        assert classnames[int(sample["cls"])] == f"moving {json.loads(sample['json'])['direction']}"


def test_the_held_out_templates_filled_with_the_class_names_cover_every_held_out_caption(splits):
    """One template per sprite and speed, each filled with a class name a caption's words: averaging a
    class's prompts averages over the sprites and speeds, and each held-out clip's caption is among them."""
    templates = (DEMO / "video_heldout" / "templates.txt").read_text().splitlines()
    classnames = (DEMO / "video_heldout" / "classnames.txt").read_text().splitlines()
    captions = {json.loads(sample["json"])["text"][0] for sample in splits["video_heldout"]}
    prompts = {template.format(classname) for template in templates for classname in classnames}
    assert len(templates) == 12 * len(SPEED) and captions <= prompts
    assert {caption.rsplit(", ", 1)[1] for caption in prompts} == set(SPEED)


def test_the_builder_makes_the_shipped_clips_again(splits, monkeypatch):
    spec = importlib.util.spec_from_file_location("build_video_shards", DEMO / "build_video_shards.py")
    builder = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, builder)  # its dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts its folder on the path to import build_demo_shards
    spec.loader.exec_module(builder)
    if not builder.FONT.is_file():
        pytest.skip(f"{builder.FONT} is not installed: apt-get install fonts-noto-color-emoji")
    drawn = builder.sprites(builder.FONT)
    for folder, samples in splits.items():
        clips = {clip.key: clip for clip in builder.clips(folder)}
        assert sorted(clips) == sorted(sample["__key__"] for sample in samples)
        for sample in samples[::23]:  # a spread of sprites, directions and speeds
            clip = clips[sample["__key__"]]
            assert builder.filmstrip(clip, drawn[clip.sprite]) == sample["png"], sample["__key__"]
    assert builder.templates() == (DEMO / "video_heldout" / "templates.txt").read_text()
