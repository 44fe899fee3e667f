"""`limoe train` (and `limoe pretrain`, which runs it with another objective): every setting and input
checked before the workdir is touched, then the trainer's loop (`limoe.training.trainer`).

Among the checks is the memory plan (`limoe.plan`): on a GPU a run that would not fit is refused
before anything is allocated. The plan measures the training code itself, so it sits between this
command and `limoe.training`, which never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from limoe.checkpoints import training as checkpoint
from limoe.checkpoints.store import has_checkpoints
from limoe.checkpoints.warm_start import check_init_from
from limoe.config import Config
from limoe.data.pipeline import check_batch_fits_in_memory, expand_shards
from limoe.files import refuse_overwriting_inputs
from limoe.plan import refuse_if_it_cannot_fit
from limoe.training.batches import micro_batch_size
from limoe.training.cotraining import check_tasks
from limoe.training.evaluation import check_eval_sets
from limoe.training.report_to import check_report_to
from limoe.training.session import Session, start_session
from limoe.training.step import ContrastiveTrainer
from limoe.training.trainer import FinalReport, Objective, objective_for, train_in_workdir
from limoe.training.workdir import locked_workdir


def check_memory_plan(config: Config, session: Session) -> None:
    """On a GPU, refuse (one line, with the numbers and the fix) a run whose memory plan does not fit."""
    if session.device.type != "cuda":
        return
    refuse_if_it_cannot_fit(config, session.world_size, torch.cuda.get_device_properties(session.device).total_memory)


def train(config: Config, workdir: Path, objective: type[Objective] = ContrastiveTrainer,
          report: Optional[FinalReport] = None) -> dict:
    """Train (or resume) in `workdir`; returns the final held-out metrics (on rank 0).

    `objective` is what is optimised (contrastive training by default; `limoe pretrain` passes
    its masked-modelling objective; `tasks:` in the config turn contrastive training into
    co-training) and `report` what is measured at the end (default: held-out retrieval and routing
    of the exported model).
    """
    refuse_overwriting_inputs({"--workdir": workdir}, checkpoint.checkpoint_sources(config.train.init_from))
    objective = objective_for(config, objective)
    if not config.tasks:  # (co-training reads the tasks' data instead)
        for source in config.data.train:  # a missing shard path fails here, before anything is built
            expand_shards(source.shards)
    check_eval_sets(config)
    check_report_to(config)
    if not has_checkpoints(workdir):  # a fresh run: a bad train.init_from fails here, before the workdir is touched
        check_init_from(config)
    session = start_session(config)
    if config.tasks:
        check_tasks(config, session.world_size)
    micro_batch_size(config, session.world_size)  # whole routing groups, before the workdir is touched
    check_memory_plan(config, session)
    largest = max([config.train.batch_size] + [config.task_batch_size(task) for task in config.tasks])
    check_batch_fits_in_memory(largest // session.world_size, config.model.image_size, config.data.workers,
                               config.data.resize_on)
    with locked_workdir(workdir, session.rank):
        return train_in_workdir(config, workdir, session, objective, report)
