"""Taking turns at an evaluation: two processes end with exactly what one process computes alone,
each having encoded only its share of the batches that can be dealt out."""

import json

from tests.helpers import TURN_SIZES, encode_turn_batches
from tests.training.processes import run_processes


def test_two_processes_take_turns_and_end_with_what_one_computes():
    outputs = run_processes("tests.evaluate.turns_worker", [], world_size=2, timeout=300)
    ranks = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    alone_encoded, alone = encode_turn_batches(shared=False)
    assert alone_encoded == list(range(len(TURN_SIZES)))
    for rank, result in enumerate(ranks):
        assert result["results"] == alone, rank  # every batch, in order, variable lengths cut back
    assert ranks[0]["encoded"] == [0, 2, 4, 5] and ranks[1]["encoded"] == [1, 3, 4, 5]


def test_one_process_encodes_every_batch_itself_even_when_shared():
    encoded, results = encode_turn_batches(shared=True)  # no process group: nobody to take turns with
    assert encoded == list(range(len(TURN_SIZES))) and results == encode_turn_batches(shared=False)[1]
