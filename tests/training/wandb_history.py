"""The history an offline W&B run logged, read back from its `run-<id>.wandb` file.

The file is a LevelDB-style log (what W&B syncs from): a 7-byte header (":W&B", magic, version),
then 32 KiB blocks of chunks, each with a 7-byte header (CRC32, length, kind: full, first, middle,
last) carrying serialized `wandb_internal_pb2.Record` protobufs. Reading it needs no network.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        else:  # zero fill at the end of the file
            return


def wandb_history(wandb_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of the one offline run under `wandb_dir` (W&B's `dir`)."""
    [run_file] = Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict[str, float]] = {}
    for data in _records(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = items.pop("_step", record.history.step.num)
        history.setdefault(int(step), {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return history
