"""Mixing weights of several training sources: given weights, else sizes as open_clip and
img2dataset record them (times the upsampling factor), else shard counts."""

import json
import logging
from pathlib import Path

import pytest

from limoe.config import ShardSource
from limoe.data.sources import mixing_weights
from limoe.errors import LimoeError


def _shards(folder: Path, count: int) -> list[str]:
    """Empty files named like shards: sizes are read beside them, the tars are never opened."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index:05d}.tar" for index in range(count)]
    for path in paths:
        path.touch()
    return [str(path) for path in paths]


def _mix(*sources: tuple[ShardSource, list[str]]) -> list[float]:
    return mixing_weights(tuple(source for source, _ in sources), [urls for _, urls in sources])


def test_each_size_record_and_the_upsampling_factor(tmp_path):
    listed = _shards(tmp_path / "listed", 2)
    (tmp_path / "listed" / "sizes.json").write_text(json.dumps({"00000.tar": 30, "00001.tar": 10}))
    stats = _shards(tmp_path / "stats", 2)
    for index, successes in enumerate([12, 8]):
        (tmp_path / "stats" / f"{index:05d}_stats.json").write_text(json.dumps({"count": 25, "successes": successes}))
    counted = _shards(tmp_path / "counted", 4)
    (tmp_path / "counted" / "__len__").write_text("100\n")
    weights = _mix((ShardSource("listed"), listed), (ShardSource("stats", upsampling=2.0), stats),
                   (ShardSource("counted"), counted[:2]))
    assert weights == [40.0, 2 * 20.0, 50.0]


def test_given_weights_win_and_one_source_needs_nothing(tmp_path):
    a, b = _shards(tmp_path / "a", 1), _shards(tmp_path / "b", 3)
    assert _mix((ShardSource("a", weight=0.3), a), (ShardSource("b", weight=0.7), b)) == [0.3, 0.7]
    assert _mix((ShardSource("a"), a)) == [1.0]


def test_unknown_sizes_fall_back_to_shard_counts_with_a_warning(tmp_path, caplog):
    known = _shards(tmp_path / "known", 2)
    (tmp_path / "known" / "__len__").write_text("1000")
    remote = ["pipe:curl -s https://example.com/00000.tar", "pipe:curl -s https://example.com/00001.tar",
              "pipe:curl -s https://example.com/00002.tar"]
    with caplog.at_level(logging.WARNING, logger="limoe.data.sources"):
        weights = _mix((ShardSource("known", upsampling=2.0), known), (ShardSource("remote"), remote))
    assert weights == [2 * 2.0, 3.0]
    assert "remote" in caplog.text and "number of shards" in caplog.text


def test_a_malformed_size_record_names_the_file(tmp_path):
    a, b = _shards(tmp_path / "a", 1), _shards(tmp_path / "b", 1)
    (tmp_path / "a" / "sizes.json").write_text('{"00000.tar": "many"}')
    with pytest.raises(LimoeError, match=r"a/sizes.json records 'many' samples"):
        _mix((ShardSource("a"), a), (ShardSource("b"), b))
