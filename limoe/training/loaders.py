"""The endless training loaders of a run, built from the config, and the seeds they start from.

`limoe train` reads `data.train` through one loader; with `tasks:` each task has its own. A run
resumed at step `start` cannot replay its data stream to that point (shuffle buffers and workers
would have to be rebuilt as they were), so its loaders start afresh from a seed derived from
(train.seed, start, task): the resumed run draws new batches, the same ones on every restart at
that step, and two tasks never share a stream.
"""

from __future__ import annotations

import torch

from limoe.config import Config, ShardSource
from limoe.data.pipeline import ShardLoader, loader_options, train_loader

SEED_STRIDE = 1_000_003  # a prime: seeds derived from one seed for different steps stay apart from other seeds'
TASK_SEED_STRIDE = 7_919  # a smaller prime: tasks' loaders at the same step differ


def resume_seed(seed: int, start: int, stream: int = 0) -> int:
    """The data seed of loader `stream` (a task's index; 0 without tasks) of a run started or resumed at step `start`."""
    return seed + SEED_STRIDE * start + TASK_SEED_STRIDE * stream


def train_loader_for(config: Config, sources: tuple[ShardSource, ...], batch_size: int, world_size: int,
                     device: torch.device, start: int, *, stream: int = 0, classification: bool = False,
                     modality: str = "image") -> ShardLoader:
    """This process's loader of `sources` for a global batch of `batch_size` over `world_size` processes,
    with the config's image size, context length and data settings, seeded for a run at step `start`;
    with `classification` it yields labelled inputs. `modality` is what the inputs are: images, or
    audio clips at the model's `model.audio.sample_rate`, `model.audio.clip_seconds` long."""
    data = config.data
    return train_loader(
        sources, batch_size // world_size, config.model.image_size, config.model.context_length, data.workers,
        data.shuffle_buffer, data.resampled, seed=resume_seed(config.train.seed, start, stream),
        max_bad_fraction=data.max_bad_fraction, classification=classification, pin_memory=device.type == "cuda",
        resize_on=data.resize_on, decode_on=data.decode_on, **loader_options(config.model, modality),
    )
