"""One rank of tests/evaluate/test_turns.py: encode known batches taking turns, print what this
rank encoded itself and every batch's encodings as it ends up with them (JSON)."""

import json

import torch

from limoe.distributed import init_process_group
from limoe.evaluate.turns import encode_in_turns
from tests.training.processes import leave_process_group

SIZES = (4, 4, 4, 4, 4, 3)  # two processes: batches 0-1 and 2-3 are dealt; 4 and 5 differ in size, both encode them


def batches() -> list[torch.Tensor]:
    return [torch.arange(size, dtype=torch.float32) + 10 * index for index, size in enumerate(SIZES)]


def encode_all(shared: bool) -> tuple[list[int], list[list[list[float]]]]:
    """(indices of the batches this process encoded, each batch's two encodings): the second
    encoding's length varies from batch to batch (index mod 3 rows), as retrieval's new images do."""
    encoded = []

    def encode(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(batch[0]) // 10
        encoded.append(index)
        return batch[:, None] * 2, batch[: index % 3, None].repeat(1, 3)  # [n, 1], [index mod 3, 3]

    results = [[first.tolist(), second.tolist()] for _, (first, second) in
               encode_in_turns(batches(), encode, lambda batch: len(batch), shared)]
    return encoded, results


if __name__ == "__main__":
    init_process_group("gloo", timeout_minutes=5)
    encoded, results = encode_all(shared=True)
    print(json.dumps({"encoded": encoded, "results": results}))
    leave_process_group()
