"""How several training sources are mixed, by open_clip's conventions.

Each sample is drawn from source i with probability ∝ w_i. With a `weight` on every source, w_i is
that weight. Otherwise w_i = size_i × upsampling_i, as open_clip samples
(`--train-data "a::b" --train-data-upsampling-factors "1::2"`): equal weights would silently
repeat a small source as often as a large one. Sizes are read the way open_clip and img2dataset
record them, beside the shards, first match wins per shard:

1. `sizes.json` in the shard's folder: `{"00000.tar": 9812, …}` (open_clip's convention);
2. `00000_stats.json` beside `00000.tar`: img2dataset's per-shard statistics, `"successes"`;
3. `__len__` in the shard's folder: its total number of samples (open_clip), split evenly
   between the folder's shards.

When some source's size cannot be read (a `pipe:` or URL spec, or none of these files), every
source is weighted by its number of shards instead, which is what open_clip's resampling of the
joined shard list amounts to, and a warning names the sources without sizes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from limoe.config import ShardSource
from limoe.errors import LimoeError

logger = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
LENGTH_FILE = "__len__"
STATS_SUFFIX = "_stats.json"
SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def mixing_weights(sources: tuple[ShardSource, ...], shards: list[list[str]]) -> list[float]:
    """One sampling weight per source (`shards[i]` are source i's expanded shard paths)."""
    if len(sources) == 1:
        return [1.0]
    if sources[0].weight is not None:  # the config gives every source a weight or none
        return [source.weight for source in sources]
    folders: dict[Path, _Folder] = {}
    sizes = [source_size(urls, folders) for urls in shards]
    unknown = [source.shards for source, size in zip(sources, sizes) if size is None]
    if unknown:
        logger.warning("data.train: no sizes.json, img2dataset _stats.json or __len__ for %s; weighting every "
                       "source by its number of shards instead of samples", ", ".join(unknown))
        sizes, unit = [len(urls) for urls in shards], "shards"
    else:
        unit = "samples"
    weights = [size * source.upsampling for size, source in zip(sizes, sources)]
    total = sum(weights)
    logger.info("data.train mixture: %s", ", ".join(
        f"{source.shards} {weight / total:.1%} ({size:.0f} {unit} × {source.upsampling:g})"
        for source, size, weight in zip(sources, sizes, weights)))
    return weights


def source_size(urls: list[str], folders: Optional[dict] = None) -> Optional[float]:
    """Samples in these shards as recorded beside them, or None if any shard's count is unknown.
    `folders` caches what was read per folder across calls."""
    folders = {} if folders is None else folders
    total = 0.0
    for url in urls:
        path = Path(url)
        if not path.is_file():  # streamed (pipe:, URL): nothing beside it to read
            return None
        folder = folders.setdefault(path.parent, _Folder(path.parent))
        size = folder.shard_size(path.name)
        if size is None:
            return None
        total += size
    return total


def _stem(name: str) -> str:
    return next((name[: -len(s)] for s in SHARD_SUFFIXES if name.endswith(s)), name)


class _Folder:
    """The size records of one shard folder, each file read at most once."""

    def __init__(self, path: Path):
        self.path = path
        self.sizes = _read_json(path / SIZES_FILE) if (path / SIZES_FILE).is_file() else {}
        self.length = _read_length(path / LENGTH_FILE) if (path / LENGTH_FILE).is_file() else None

    def shard_size(self, name: str) -> Optional[float]:
        if name in self.sizes:
            return _count(self.sizes[name], self.path / SIZES_FILE)
        stats = self.path / f"{_stem(name)}{STATS_SUFFIX}"
        if stats.is_file():
            return _count(_read_json(stats).get("successes"), stats)
        if self.length is not None:
            shards = [p for p in self.path.iterdir() if p.name.endswith(SHARD_SUFFIXES)]
            return self.length / max(len(shards), 1)
        return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LimoeError(f"cannot read the shard sizes in {path} ({error}); fix or delete the file.") from None
    if not isinstance(data, dict):
        raise LimoeError(f"{path} must hold a JSON object of shard sizes; fix or delete the file.")
    return data


def _count(value, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LimoeError(f"{path} records {value!r} samples for a shard; write a count ≥ 0 or delete the file.")
    return float(value)


def _read_length(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, UnicodeDecodeError, ValueError):
        raise LimoeError(f"{path} must hold the folder's number of samples; fix or delete the file.") from None
