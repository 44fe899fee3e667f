"""limoe.data.readers: a modality the pipeline reads is one reader module and its name in READERS,
with pipeline.py unchanged; a modality no reader is registered for is refused in one line."""

import io
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from limoe.config import ModelConfig
from limoe.data import readers
from limoe.data.pipeline import eval_loader, loader_options
from limoe.errors import LimoeError

CONTEXT = 16


class UnusableVector(Exception):
    """A vector that is skipped; `args[0]` is the reason counted."""


@dataclass(frozen=True)
class VectorReader(readers.Reader):
    """A made-up modality: `.npy` vectors of `length` numbers, doubled when prepared."""

    length: int

    name = "vector"
    extensions = ("npy",)
    listed_captions = False
    unusable = UnusableVector
    inputs = "vectors"

    @classmethod
    def from_options(cls, image_size, resize_on, decode_on, length=None):
        return cls(length)

    @classmethod
    def loader_options(cls, config):
        return {"length": 3}

    def decode(self, data, train, draws):
        vector = np.load(io.BytesIO(data))
        if vector.shape != (self.length,):
            raise UnusableVector("wrong_length")
        return vector

    def prepare(self, decoded, train):
        return decoded * 2

    def collate(self, inputs, train):
        return torch.from_numpy(np.stack(inputs))  # [B, length]


@pytest.fixture
def vector_registered(monkeypatch):
    module = types.ModuleType("limoe.data.readers.vector")
    module.READER = VectorReader
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(readers, "READERS", (*readers.READERS, "vector"))


def _npy(values) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values, dtype=np.float32))
    return buffer.getvalue()


def _vector_shard(path: Path) -> str:
    samples = [
        {"__key__": "a", "npy": _npy([1, 2, 3]), "txt": b"one"},
        {"__key__": "b", "npy": _npy([4, 5]), "txt": b"too short"},
        {"__key__": "c", "npy": _npy([6, 7, 8]), "txt": b"two"},
        {"__key__": "d", "txt": b"no vector at all"},
        {"__key__": "e", "npy": _npy([9, 10, 11]), "txt": b"three"},
    ]
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def test_a_registered_reader_is_read_by_the_pipeline_as_it_says(tmp_path, vector_registered):
    shard = _vector_shard(tmp_path / "00000.tar")
    loader = eval_loader(shard, 2, 8, CONTEXT, 0, max_bad_fraction=1.0,
                         **loader_options(ModelConfig(), "vector"))
    batches = list(loader)
    assert [batch.keys for batch in batches] == [["a", "c"], ["e"]]  # the last batch partial, in shard order
    assert torch.equal(torch.cat([batch.images for batch in batches]),
                       torch.tensor([[2, 4, 6], [12, 14, 16], [18, 20, 22]], dtype=torch.float32))
    assert [batch.tokens.shape for batch in batches] == [(2, CONTEXT), (1, CONTEXT)]
    assert loader.bad_samples.bad == {"wrong_length": 1, "no_vector": 1}  # its own reason, and a missing member


def test_loader_options_name_the_modality_and_its_readers_settings(vector_registered):
    config = ModelConfig()
    assert loader_options(config, "vector") == {"modality": "vector", "length": 3}
    assert loader_options(config, "image") == {"modality": "image"}
    assert loader_options(config, "audio") == {"modality": "audio", "sample_rate": config.audio.sample_rate,
                                               "clip_seconds": config.audio.clip_seconds}


def test_a_modality_without_a_reader_is_refused_in_one_line(tmp_path):
    shard = _vector_shard(tmp_path / "00000.tar")
    with pytest.raises(LimoeError, match=r"^modality 'smell' cannot be read from shards; use 'image', 'audio' or "
                                         r"'video'\.$"):
        eval_loader(shard, 2, 8, CONTEXT, 0, modality="smell")
