"""Sharing one evaluation's forwards among the processes of a run, without changing its numbers.

Evaluation during training runs on every process (under expert parallelism each MoE layer's
forward is an all-to-all that needs all of them), and every process reads the same batches in
the same order. Taking turns: each run of W consecutive batches of equal size is dealt out, one
batch per process, each process encodes only its own, and the encodings are gathered so that
every process ends with all of them. The batches that do not make such a run (the partial last
batch and the ones that share its run) are encoded by every process, as before.

A batch is therefore always encoded whole, with the same batch-mates as in a single process, so
the routing (capacity is counted per group within a batch) and the numbers are exactly those of
`limoe eval`; every forward happens on all processes at once with the same shapes, as the expert
all-to-all needs; and W processes encode about 1/W of the set each. Reading and decoding the
images is not shared: every process still reads the whole set.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from limoe.distributed import rank_and_world

Batch = TypeVar("Batch")
Encode = Callable[[Batch], Sequence[Tensor]]  # a batch → its encodings, each [n, …] on the model's device


def encode_in_turns(batches: Iterable[Batch], encode: Encode, size: Callable[[Batch], Hashable],
                    shared: bool) -> Iterator[tuple[Batch, Sequence[Tensor]]]:
    """Each batch with its encodings, in order. `shared`: every process of the run calls this on
    the same batches at the same time, and they take turns, dealing out runs of batches whose
    `size` (the shapes their forwards take) is equal; otherwise this process encodes all."""
    rank, world = rank_and_world()
    if not shared or world == 1:
        for batch in batches:
            yield batch, encode(batch)
        return
    run: list[Batch] = []
    for batch in batches:
        run.append(batch)
        if len(run) < world:
            continue
        if len({size(b) for b in run}) == 1:
            yield from zip(run, _gathered(encode(run[rank]), world))
        else:
            yield from ((b, encode(b)) for b in run)
        run = []
    yield from ((b, encode(b)) for b in run)


def _gathered(encodings: Sequence[Tensor], world: int) -> list[list[Tensor]]:
    """Every process's encodings, by process: [process][encoding] (first dimensions may differ
    between processes, so each is padded to the largest for the gather, then cut back)."""
    device = encodings[0].device
    counts = torch.tensor([e.shape[0] for e in encodings], device=device)  # [encodings]
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    per_process: list[list[Tensor]] = [[] for _ in range(world)]
    for index, encoding in enumerate(encodings):
        longest = max(int(c[index]) for c in all_counts)
        padded = torch.zeros((longest, *encoding.shape[1:]), dtype=encoding.dtype, device=device)
        padded[: encoding.shape[0]] = encoding
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        for process, part in enumerate(parts):
            per_process[process].append(part[: int(all_counts[process][index])])
    return per_process
