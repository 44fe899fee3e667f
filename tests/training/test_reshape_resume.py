"""Resuming on another process layout: 2 processes with expert parallelism 2 → 1 process, and back
(under ZeRO 2, whose partitioned moments DeepSpeed's fragment API fills).

The first run trains a few steps on a fixed global batch, checkpoints, and goes on; the resumed
run restores the checkpoint on the other layout. Every restored weight, Adam moment and step
equals the checkpoint's (and, on one process, the consolidated model and AdamW's own state), and
the resumed run's losses are the uninterrupted run's: the experts landed where they belong and
the optimizer continues exactly. Router noise is off, so both layouts compute the same function.
"""

import json
from pathlib import Path

import pytest

from limoe.checkpoints.store import CHECKPOINT_DIR
from limoe.config import load_config
from tests.training.processes import run_processes
from tests.helpers import RESHAPE_CONTINUED, RESHAPE_SAVED_AT


def _results(workdir: Path, phase: str, processes: int) -> list[dict]:
    return [json.loads((workdir / f"{phase}.rank{rank}.json").read_text()) for rank in range(processes)]


@pytest.mark.parametrize("saved, resumed", [((2, 2, 0), (1, 1, 0)),
                                            pytest.param((1, 1, 0), (2, 2, 2), marks=pytest.mark.slow)],
                         ids=["2x2-to-1", "1-to-2x2-zero2"])  # the second starts three processes: slow
def test_a_checkpoint_resumes_on_another_process_layout(tmp_path, saved, resumed):
    """(processes, expert-parallel size, ZeRO stage) of the first run and of the resumed one."""
    (saved_processes, saved_ep, saved_zero), (resumed_processes, resumed_ep, resumed_zero) = saved, resumed
    run_processes("tests.training.reshape_worker", [str(tmp_path), str(saved_ep), str(saved_zero), "first"],
                  saved_processes)
    run_processes("tests.training.reshape_worker", [str(tmp_path), str(resumed_ep), str(resumed_zero), "resume"],
                  resumed_processes)
    first = _results(tmp_path, "first", saved_processes)[0]
    resumed_ranks = _results(tmp_path, "resume", resumed_processes)

    for result in resumed_ranks:
        assert result["step"] == RESHAPE_SAVED_AT
    with (tmp_path / CHECKPOINT_DIR / "step_00000002" / "manifest.json").open() as manifest:
        files = json.load(manifest)["files"]
    assert any(name.startswith("model.rank00001") for name in files) == (saved_processes == 2)
    checked = set().union(*(result["checked"] for result in resumed_ranks))
    experts = [name for name in checked if "experts" in name]
    moe = load_config("demo").model
    assert len(experts) == len(moe.moe_layers) * moe.moe.num_experts * 4 * 4  # 4 tensors × (weight, 2 moments, step)
    if resumed_processes == 1:  # and without the expert mapping: the consolidated model, AdamW's own state
        assert resumed_ranks[0]["unsharded_checked"] > 0
    else:  # each rank restored only its own experts
        own = [{name for name in result["checked"] if "experts" in name} for result in resumed_ranks]
        assert own[0] and own[1] and not own[0] & own[1]

    continued = resumed_ranks[0]["losses"]
    uninterrupted = first["losses"][RESHAPE_SAVED_AT:RESHAPE_SAVED_AT + RESHAPE_CONTINUED]
    assert continued[0] == pytest.approx(uninterrupted[0], rel=1e-5)  # the restored model
    if resumed_zero == saved_zero:  # the same optimizer code: the same updates (ZeRO clips in DeepSpeed)
        assert continued == pytest.approx(uninterrupted, rel=1e-5)
    assert continued[-1] < continued[0]
