"""Training batches on the GPU, each copied while the step before it runs.

The loader's workers hand over uint8 images and int64 tokens (or labels) in pinned memory (DataLoader
`pin_memory`). On CUDA, `DeviceBatches` issues the copy of batch n+1 on a side stream as soon as
batch n is handed out, so the copy overlaps step n; when batch n+1 is taken the compute stream
waits for the copy on the device (an event, not the host). On a CPU batches pass through.

A `WaitClock` adds up the host seconds spent waiting for the loader (open_clip's `Data (t)`).

Images that come uncropped (`data.resize_on: device`) are cropped and resized here, on the compute
stream of the device (on a CPU-only run, in the main process), into the [B, 3, S, S] uint8 every
training step takes.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional, Union

import torch

from limoe.data.crops import Uncropped, crop_on_device
from limoe.data.pipeline import LabelledBatch, TrainBatch

Batch = Union[TrainBatch, LabelledBatch]


def cropped(batch: Batch) -> Batch:
    """The batch with its images cropped, where the loader left that to the device."""
    return batch._replace(images=crop_on_device(batch.images)) if isinstance(batch.images, Uncropped) else batch


def _tensors(batch: tuple) -> Iterator[torch.Tensor]:
    for item in batch:
        if isinstance(item, tuple):
            yield from _tensors(item)
        elif isinstance(item, torch.Tensor):
            yield item


def to_device(batch: tuple, device: torch.device) -> tuple:
    """The batch's tensors (in nested tuples too) copied to `device` without blocking the host."""
    return type(batch)(*(to_device(item, device) if isinstance(item, tuple) else
                         item.to(device, non_blocking=True) if isinstance(item, torch.Tensor) else item
                         for item in batch))


class WaitClock:
    """Host seconds spent waiting for batches since the last `take()`, over every loader timed with it."""

    def __init__(self):
        self.seconds = 0.0

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class DeviceBatches:
    def __init__(self, loader: Iterable[Batch], device: torch.device, clock: Optional[WaitClock] = None):
        self.loader = loader
        self.device = device
        self.clock = clock or WaitClock()

    def _timed(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.clock.seconds += time.perf_counter() - start
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type != "cuda":
            yield from map(cropped, self._timed())
            return
        copies = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        batches = self._timed()

        def copy(batch: Batch) -> Batch:
            with torch.cuda.stream(copies):
                return to_device(batch, self.device)

        ahead = copy(next(batches))
        for batch in batches:
            ready = ahead
            compute.wait_stream(copies)
            for tensor in _tensors(ready):  # allocated on the copy stream, used on the compute stream
                tensor.record_stream(compute)
            ahead = copy(batch)
            yield cropped(ready)
