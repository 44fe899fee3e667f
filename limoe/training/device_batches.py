"""Training batches on the GPU, each copied while the step before it runs.

The loader's workers hand over uint8 images and int64 tokens in pinned memory (DataLoader
`pin_memory`). On CUDA, `DeviceBatches` issues the copy of batch n+1 on a side stream as soon as
batch n is handed out, so the copy overlaps step n; when batch n+1 is taken the compute stream
waits for the copy on the device (an event, not the host). On a CPU batches pass through.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from limoe.data.pipeline import TrainBatch


class DeviceBatches:
    def __init__(self, loader: Iterable[TrainBatch], device: torch.device):
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[TrainBatch]:
        if self.device.type != "cuda":
            yield from self.loader
            return
        copies = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        batches = iter(self.loader)

        def copy(batch: TrainBatch) -> TrainBatch:
            with torch.cuda.stream(copies):
                return TrainBatch(*(t.to(self.device, non_blocking=True) for t in batch))

        ahead = copy(next(batches))
        for batch in batches:
            ready = ahead
            compute.wait_stream(copies)
            for tensor in ready:  # allocated on the copy stream, used on the compute stream
                tensor.record_stream(compute)
            ahead = copy(batch)
            yield ready
