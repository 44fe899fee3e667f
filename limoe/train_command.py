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
from limoe.data.pipeline import check_batch_fits_in_memory
from limoe.files import refuse_overwriting_inputs
from limoe.plan import refuse_if_it_cannot_fit
from limoe.training.evaluation import check_eval_sets
from limoe.training.objectives import objective_for
from limoe.training.report_to import check_report_to
from limoe.training.session import Session, start_session
from limoe.training.trainer import FinalReport, Objective, train_in_workdir
from limoe.training.workdir import locked_workdir


def check_memory_plan(config: Config, session: Session) -> None:
    """On a GPU, refuse (one line, with the numbers and the fix) a run whose memory plan does not fit."""
    if session.device.type != "cuda":
        return
    refuse_if_it_cannot_fit(config, session.world_size, torch.cuda.get_device_properties(session.device).total_memory)


def train(config: Config, workdir: Path, objective: Optional[type[Objective]] = None,
          report: Optional[FinalReport] = None) -> dict:
    """Train (or resume) in `workdir`; returns the final held-out metrics (on rank 0).

    `objective` is what is optimised (by default `limoe train`'s: contrastive training, or
    co-training with `tasks:` in the config; `limoe pretrain` passes its masked-modelling
    objective) and `report` what is measured at the end (default: held-out retrieval and routing
    of the exported model).
    """
    refuse_overwriting_inputs({"--workdir": workdir}, checkpoint.checkpoint_sources(config.train.init_from))
    objective = objective or objective_for(config)
    check_eval_sets(config)
    check_report_to(config)
    if not has_checkpoints(workdir):  # a fresh run: a bad train.init_from fails here, before the workdir is touched
        check_init_from(config)
    session = start_session(config)
    objective.check(config, session.world_size)  # its data and batch split, before the workdir is touched
    check_memory_plan(config, session)
    check_batch_fits_in_memory(objective.largest_local_batch(config, session.world_size), config.model.image_size,
                               config.data.workers, config.data.resize_on)
    with locked_workdir(workdir, session.rank):
        return train_in_workdir(config, workdir, session, objective, report)
