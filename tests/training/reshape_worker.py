"""One process of the reshape-resume check, launched by test_reshape_resume.py.

`first`: train RESHAPE_SAVED_AT steps on a fixed global batch, save a training checkpoint, train
RESHAPE_CONTINUED more steps and record every loss (the uninterrupted run). `resume`: on another
process layout, restore that checkpoint, compare every restored weight, Adam moment and step with
the checkpoint's entries, train RESHAPE_CONTINUED steps and record the losses.
Run as: python -m tests.training.reshape_worker WORKDIR EXPERT_PARALLEL_SIZE ZERO_STAGE PHASE (rank from env).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from limoe.checkpoints import training as checkpoint
from limoe.checkpoints.engine_state import engine_entries
from limoe.checkpoints.expert_entries import stacked_experts
from limoe.config import load_config
from limoe.training.session import start_session
from limoe.training.step import train_step
from limoe.training.trainer import build_engine
from tests.helpers import COMPARABLE, RESHAPE_CONTINUED, RESHAPE_SAVED_AT, fixed_batch, rank_rows
from tests.training.processes import leave_process_group

def losses(engine, config, session, steps: int) -> list[float]:
    images, tokens = fixed_batch(config)
    local = rank_rows(session.rank, session.world_size)
    result = []
    for _ in range(steps):
        terms, _, _ = train_step(engine, images[local], tokens[local], config)
        loss = terms["loss"].clone()
        dist.all_reduce(loss)
        result.append(loss.item() / session.world_size)
    return result


def compare_with_checkpoint(engine, stored) -> list[str]:
    """Names of the entries this process checked: each live value equals the stored one exactly."""
    model, optimizer = engine_entries(engine, keep_shared=True, keep_experts=True)
    checked = []
    for kind, live in (("model", model), ("optimizer", optimizer)):
        with stored.entries(kind) as entries:
            for name, value in live.items():
                assert torch.equal(value, entries[name].float()), name
                checked.append(f"{kind}:{name}")
    return checked


def compare_unsharded(engine, workdir: Path, stored) -> int:
    """One process holds the whole model: its state dict is the consolidated one, and AdamW's
    state of each parameter is the stored one under the parameter's own name, the per-expert entries
    stacked as a whole state (not by the layer's own checkpoint mapping)."""
    consolidated, _ = checkpoint.consolidated_state(workdir)
    live = engine.module.model.state_dict()
    assert live.keys() == consolidated.keys()
    for name, value in consolidated.items():
        assert torch.equal(live[name], value), name
    with stored.entries("optimizer") as entries:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            prefix = f"{key}/"
            saved = stacked_experts({name[len(prefix):]: entries[name] for name in entries if name.startswith(prefix)})
            for name, parameter in engine.module.named_parameters():
                state = engine.optimizer.state[parameter]
                if key == "step":  # experts: one step per expert entry, all the parameter's own
                    assert float(state["step"]) == RESHAPE_SAVED_AT, name
                    assert torch.all(saved[name] == RESHAPE_SAVED_AT), name
                else:
                    assert torch.equal(state[key], saved[name]), (key, name)
    return len(consolidated)


def main(workdir: Path, expert_parallel_size: int, zero_stage: int, phase: str) -> None:
    config = load_config("demo", COMPARABLE + [f"distributed.expert_parallel_size={expert_parallel_size}",
                                               f"distributed.zero_stage={zero_stage}"])
    session = start_session(config)
    engine = build_engine(config, session)
    result = {}
    if phase == "first":
        result["losses"] = losses(engine, config, session, RESHAPE_SAVED_AT)
        checkpoint.save_training_checkpoint(engine, workdir, RESHAPE_SAVED_AT, config)
        result["losses"] += losses(engine, config, session, RESHAPE_CONTINUED)
    else:
        stored = checkpoint.find_resume_checkpoint(workdir)
        result["step"] = checkpoint.restore_training_checkpoint(engine, stored, config)["step"]
        result["lr"] = engine.get_lr()[0]
        result["checked"] = compare_with_checkpoint(engine, stored)
        if session.world_size == 1 and zero_stage == 0:
            result["unsharded_checked"] = compare_unsharded(engine, workdir, stored)
        result["losses"] = losses(engine, config, session, RESHAPE_CONTINUED)
    (workdir / f"{phase}.rank{session.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    leave_process_group()
