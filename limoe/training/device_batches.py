"""Training batches on the GPU, each copied while the step before it runs.

The loader's workers hand over uint8 images and int64 tokens (or labels) in pinned memory (DataLoader
`pin_memory`). On CUDA, `DeviceBatches` issues the copy of batch n+1 on a side stream as soon as
batch n is handed out, so the copy overlaps step n; when batch n+1 is taken the compute stream
waits for the copy on the device (an event, not the host). On a CPU batches pass through.

A `WaitClock` adds up the host seconds spent waiting for the loader (open_clip's `Data (t)`).
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

import torch

from limoe.data.pipeline import TrainBatch


class WaitClock:
    """Host seconds spent waiting for batches since the last `take()`, over every loader timed with it."""

    def __init__(self):
        self.seconds = 0.0

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class DeviceBatches:
    def __init__(self, loader: Iterable[TrainBatch], device: torch.device, clock: Optional[WaitClock] = None):
        self.loader = loader
        self.device = device
        self.clock = clock or WaitClock()

    def _timed(self) -> Iterator[TrainBatch]:
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.clock.seconds += time.perf_counter() - start
            yield batch

    def __iter__(self) -> Iterator[TrainBatch]:
        if self.device.type != "cuda":
            yield from self._timed()
            return
        copies = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        batches = self._timed()

        def copy(batch: TrainBatch) -> TrainBatch:
            with torch.cuda.stream(copies):
                return type(batch)(*(t.to(self.device, non_blocking=True) for t in batch))

        ahead = copy(next(batches))
        for batch in batches:
            ready = ahead
            compute.wait_stream(copies)
            for tensor in ready:  # allocated on the copy stream, used on the compute stream
                tensor.record_stream(compute)
            ahead = copy(batch)
            yield ready
