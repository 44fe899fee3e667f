"""K-shot support sets: which labelled samples a few-shot method may learn from, and the rest.

The support set is, for each class, the K samples whose keys hash lowest under the seed
(BLAKE2b of "seed/key"): reproducible from the seed alone, independent of shard order, data
workers and batch size, and different seeds give independent draws. A class with K or fewer
samples gives all of them. One pass over the data also encodes every input (image, or audio clip
of an audio set) with the model as it is (the zero-shot and linear-probe features); only the support
inputs are kept in memory.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from limoe.data.pipeline import EvalBatch
from limoe.evaluate.inputs import counted_as, encode_inputs, labelled_set_needs
from limoe.evaluate.runtime import inference, nothing_read
from limoe.model.tower import Limoe


@dataclass
class FewShotSplit:
    """Every labelled sample of a set, its features, and the support samples' inputs."""

    keys: list[str]  # [N] sample keys, in reading order
    labels: Tensor  # [N] int64
    features: Tensor  # [N, D] the model's L2-normalised features of the inputs, on the CPU
    support: Tensor  # [N] bool, True for support samples
    support_inputs: Tensor  # [S, 3, H, W] images or [S, T] clips of the support samples, in row order of `support`
    support_labels: Tensor  # [S] int64

    @property
    def queries(self) -> Tensor:
        return ~self.support


def support_priority(seed: int, key: str) -> int:
    """A sample's rank for the support draw: lower is drawn first."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "big")


def read_few_shot_split(model: Limoe, batches: Iterable[EvalBatch], shots: int, seed: int,
                        progress: bool = False, modality: str = "image") -> FewShotSplit:
    """Read labelled `batches` once: encode every input of `modality` (images, audio clips) and
    keep the K-shot support inputs."""
    keys, labels, features = [], [], []
    kept: dict[int, list[tuple[int, str, Tensor]]] = {}  # class → heap of (−priority, key, input), at most K
    with inference(model) as device:
        for batch in tqdm(batches, desc=counted_as(modality), unit="batch", disable=not progress):
            features.append(encode_inputs(model, modality, batch.images.to(device)).cpu())  # [B, D]
            keys.extend(batch.keys)
            labels.append(batch.labels)
            for key, label, image in zip(batch.keys, batch.labels.tolist(), batch.images):
                heap = kept.setdefault(label, [])
                priority = -support_priority(seed, key)
                if len(heap) < shots:
                    heapq.heappush(heap, (priority, key, image.clone()))  # a copy: a view would keep the batch
                elif priority > heap[0][0]:
                    heapq.heapreplace(heap, (priority, key, image.clone()))
    if not labels:
        raise nothing_read(batches, f"few-shot tuning needs {labelled_set_needs(modality)}")
    chosen = {key: (label, image) for label, heap in kept.items() for _, key, image in heap}
    support = torch.tensor([key in chosen for key in keys])
    rows = [chosen[key] for key, chosen_row in zip(keys, support.tolist()) if chosen_row]
    return FewShotSplit(keys, torch.cat(labels), torch.cat(features), support,
                        torch.stack([image for _, image in rows]), torch.tensor([label for label, _ in rows]))
