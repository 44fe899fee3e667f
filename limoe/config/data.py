"""`data`: the shard sources a run trains on, how they are mixed, and how their samples are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from limoe.config.keys import setting
from limoe.errors import LimoeError


@dataclass(frozen=True)
class ShardSource:
    """A set of webdataset shards and how often it is drawn when mixed with other sources."""

    shards: str = setting(meaning="shard spec: a folder, glob, brace pattern, list of those, pipe: command or URL")
    weight: Optional[float] = setting(None, "sampling weight relative to the other sources; null: in proportion "
                                            "to the source's size (docs/DATA.md)", "(0, inf)")
    upsampling: float = setting(1.0, "multiplies the size-proportional weight (open_clip's "
                                     "--train-data-upsampling-factors)", "(0, inf)")

    def __post_init__(self):
        if self.weight is not None and self.upsampling != 1.0:
            raise LimoeError(f"data.train source {self.shards}: give a weight or an upsampling factor, not both.")

    @classmethod
    def from_yaml_entry(cls, value: Any) -> list:
        """The sources one YAML list entry stands for (the codec's convention): a string is a shard
        spec, and open_clip's `a::b` names several; anything else is decoded as a mapping of keys."""
        if isinstance(value, str):
            return [{"shards": spec} for spec in value.split("::")]
        return [value]


@dataclass(frozen=True)
class DataConfig:
    """Where training and held-out pairs come from and how they are read."""

    train: tuple[ShardSource, ...] = setting(
        (ShardSource("data_shards/train"),), "training sources: one shard spec, open_clip's 'a::b' list of specs, "
        "or a list of sources with the keys below")
    heldout: str = setting("data_shards/heldout", "caption shards for the end-of-training retrieval report")
    workers: int = setting(2, "data loading processes per rank", "[0, inf)")
    shuffle_buffer: int = setting(1000, "samples in each worker's shuffle buffer (0 or 1: no shuffling)", "[0, inf)")
    resampled: bool = setting(True, "draw shards with replacement (LAION-style); false: shuffled epochs")
    max_bad_fraction: float = setting(0.01, "stop once a worker's fraction of unusable samples passes this",
                                      "[0, 1]")
    resize_on: Literal["worker", "device"] = setting(
        "worker", "where training crops are resized: in the data workers (PIL), or on the device after the copy "
        "(batched, with PIL's bicubic weights; the main process on a CPU-only run), which frees about 40% of a "
        "worker's time at 224 px")
    decode_on: Literal["worker", "device"] = setting(
        "worker", "where images are decoded: in the data workers (PIL), or on the device (nvJPEG on CUDA, "
        "torchvision's decode_jpeg; PNG, WebP and CMYK images fall back to the CPU, counted); device needs "
        "resize_on: device")

    def __post_init__(self):
        if len({source.weight is None for source in self.train}) > 1:
            raise LimoeError("data.train: give every source a weight, or none (then sources are mixed in "
                             "proportion to their sizes).")
