"""One process of the distributed co-training check, launched by test_cotraining.py.

Builds the demo model with three tasks through the trainer's own functions — pairs, classification
over all 8 classes, classification over 4 candidates — and runs 4 steps of a weighted schedule,
then 2 steps of `accumulate`, on its slice of fixed global batches; it saves a training checkpoint
and writes each step's loss for the test to compare.
Run as: python -m tests.training.cotrain_worker OUTDIR EXPERT_PARALLEL_SIZE (rank from env).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from limoe.checkpoints import training as checkpoint
from limoe.config import dump_config, load_config
from limoe.data.pipeline import LabelledBatch, TrainBatch
from limoe.training.candidates import prompt_tokens
from limoe.training.cotraining import ClassificationTask, Task, cotrain_step
from limoe.training.schedules import TaskSchedule
from limoe.training.session import start_session
from limoe.training.trainer import build_engine

from tests.helpers import COMPARABLE, GLOBAL_BATCH, rank_rows, write_config
from tests.training.processes import leave_process_group

CLASSES = [f"class {i}" for i in range(8)]
# 2 templates: 16 prompts (8 per rank) for `all`, 8 (4 per rank) for 4 candidates, so the prompts'
# routing groups are the same on 1 and 2 processes.
TEMPLATES = ["a photo of {}.", "{} emoji"]
CONFIG = {
    "base": "demo",
    "train": {"steps": 4},
    "tasks": [
        {"name": "pairs", "kind": "contrastive", "data": "data_shards/train", "steps": 2},
        {"name": "labels", "kind": "classification", "data": "data_shards/train_cls", "steps": 1},
        {"name": "few", "kind": "classification", "data": "data_shards/train_cls", "steps": 1, "candidates": 4,
         "loss_weight": 0.5},
    ],
    "schedule": {"kind": "weighted", "seed": 3},
}


def _batches(task: int, uses: int, config, rank: int, world: int) -> list:
    """This rank's slice of `uses` fixed global batches for one task."""
    generator = torch.Generator().manual_seed(100 + task)
    size, local = config.model.image_size, rank_rows(rank, world)
    batches = []
    for _ in range(uses):
        images = torch.randn(GLOBAL_BATCH, 3, size, size, generator=generator)[local]
        if task == 0:
            tokens = torch.randint(1, 1000, (GLOBAL_BATCH, config.model.context_length), generator=generator)
            tokens[:, 9:] = 0
            batches.append(TrainBatch(images, tokens[local]))
        else:  # the 4-candidate task's labels use 3 classes, so its candidates are always exactly 4
            labels = torch.randint(0, 8 if task == 1 else 3, (GLOBAL_BATCH,), generator=generator)
            batches.append(LabelledBatch(images, labels[local]))
    return batches


def main(outdir: Path, expert_parallel_size: int) -> None:
    config = load_config(write_config(outdir / "tasks.yaml", CONFIG),
                         COMPARABLE + [f"distributed.expert_parallel_size={expert_parallel_size}"])
    session = start_session(config)
    engine = build_engine(config, session)
    prompts = prompt_tokens(CLASSES, TEMPLATES, config.model.context_length)
    tasks = [Task(config.tasks[0], _batches(0, 4, config, session.rank, session.world_size), session.device)]
    for index in (1, 2):
        batches = _batches(index, 3, config, session.rank, session.world_size)
        tasks.append(ClassificationTask(config.tasks[index], batches, session.device, CLASSES, prompts,
                                        len(TEMPLATES), config.schedule.seed))
    weighted, accumulate = TaskSchedule.from_config(config), TaskSchedule("accumulate", 0, 3, 2)
    losses = []
    for step, schedule in enumerate([weighted] * 4 + [accumulate] * 2):
        outcome = cotrain_step(engine, tasks, schedule.tasks_at(step), step, config, session.world_size)
        loss = torch.stack([outcome.terms["loss"], outcome.terms["grad_norm"]])
        dist.all_reduce(loss)
        losses.append({"tasks": schedule.tasks_at(step), "loss": loss[0].item() / session.world_size,
                       "grad_norm": outcome.terms["grad_norm"].item()})
    if session.rank == 0:
        dump_config(config, outdir / "config.yaml")
    checkpoint.save_training_checkpoint(engine, outdir, 6, config, objective=engine.module.name)
    if session.rank == 0:
        (outdir / "result.json").write_text(json.dumps(losses))
    leave_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
