"""One rank of tests/evaluate/test_turns.py: encode known batches taking turns, print what this
rank encoded itself and every batch's encodings as it ends up with them (JSON)."""

import json

from limoe.distributed import init_process_group
from tests.helpers import encode_turn_batches
from tests.training.processes import leave_process_group


if __name__ == "__main__":
    init_process_group("gloo", timeout_minutes=5)
    encoded, results = encode_turn_batches(shared=True)
    print(json.dumps({"encoded": encoded, "results": results}))
    leave_process_group()
