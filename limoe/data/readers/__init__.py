"""The modalities the input pipeline reads from shards: this registry, and one reader per modality.

`limoe.data.pipeline` does everything that is the same for every modality — shards, mixing,
shuffling, captions and labels, bad-sample accounting, batching — and asks the modality's
`Reader` for the rest: which shard members hold its input, how their bytes decode (its own
unusable-input error becomes a counted bad sample with that error's reason), what of a decoded
input a batch carries (the crop or window), how a batch's inputs stack into one tensor, which
`train_loader` / `eval_loader` keywords its settings take and how to read them off a model
config, and how many host bytes one input takes in a training batch.

Each reader's module (`limoe.data.readers.image`, `audio`, `video`) defines `READER`, its class.
A new modality is a module here and its name in `READERS`; the pipeline does not change.
This root imports no reader module (`reader_type` imports one when asked), as
`limoe.modalities` does, so that a reader module may import `Reader` from here.
"""

from __future__ import annotations

import importlib
import random
from typing import TYPE_CHECKING, Callable, Literal, Optional

from limoe.errors import LimoeError

if TYPE_CHECKING:
    from limoe.config import ModelConfig

READERS: tuple[str, ...] = ("image", "audio", "video")  # the modalities shards can hold


class Reader:
    """How the pipeline reads one modality's samples; one instance holds the settings of one loader.

    `extensions` lists the shard members read as the input, preferred first (a sample without any is
    bad: `no_<name>`); `listed_captions` says whether captions may come as LAION-CLAP's list in the
    `.json` sidecar besides the `.txt`; `unusable` is the error `decode` raises for bytes it cannot
    use, whose `args[0]` is the reason counted. `inputs` is what messages call its inputs (images,
    clips); `uncropped_on_device` says whether resize_on="device" leaves them uncropped in the batch."""

    name: str
    extensions: tuple[str, ...]
    listed_captions: bool
    unusable: type[Exception]
    inputs: str
    uncropped_on_device: bool = False

    @classmethod
    def from_options(cls, image_size: int, resize_on: Literal["worker", "device"],
                     decode_on: Literal["worker", "device"], **options) -> Reader:
        """The reader of a loader with these settings; refuses (LimoeError) options it cannot read with."""
        raise NotImplementedError

    @classmethod
    def loader_options(cls, config: ModelConfig) -> dict:
        """The modality's own `train_loader` / `eval_loader` keywords, as `config`'s model takes its inputs."""
        raise NotImplementedError

    @classmethod
    def input_bytes(cls, config: ModelConfig, resize_on: Literal["worker", "device"]) -> int:
        """Host bytes of one input as training batches carry it (the host-memory check)."""
        raise NotImplementedError

    def check_decoder(self, first_sample: Callable[[], Optional[dict]]) -> None:
        """Stop before any worker starts when what the shards hold needs a decoder that is missing
        (a worker's error reaches the user wrapped in its traceback); `first_sample()` is a local
        shard's first sample, {} when it has none, None when it cannot be read here."""

    def decode(self, data: bytes, train: bool, draws: Optional[random.Random]) -> object:
        """A member's bytes → the decoded input, or `unusable`; `draws` (training) picks random windows."""
        raise NotImplementedError

    def prepare(self, decoded: object, train: bool) -> object:
        """What a batch carries of one decoded input (cropped, or the box the device crops)."""
        raise NotImplementedError

    def collate(self, inputs: list, train: bool) -> object:
        """A batch's prepared inputs → the batch's `images` (a tensor, or an `Uncropped`)."""
        raise NotImplementedError


def reader_type(name: str) -> type[Reader]:
    """The reader class of a modality shards can hold, from its module `limoe.data.readers.<name>`."""
    if name not in READERS:
        raise LimoeError(f"modality {name!r} cannot be read from shards; use "
                         f"{', '.join(repr(n) for n in READERS[:-1])} or {READERS[-1]!r}.")
    return importlib.import_module(f"{__name__}.{name}").READER
