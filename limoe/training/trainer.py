"""`limoe train`: contrastive training inside the DeepSpeed engine, with expert parallelism.

The same code runs as one CPU process and as many GPU processes under `deepspeed` or
`torchrun`. DeepSpeed owns the process groups, the optimizer step, gradient reduction (expert
gradients over the expert-data-parallel group only) and ZeRO; checkpoints are limoe's own
(`limoe.checkpoints.training`: code-free, resumable on another process layout); this module
builds the pieces (`limoe.training.deepspeed_config` the engine's config, `limoe.training.step`
one exact step at any micro-batch size), runs the loop, and reports. The command around it
(`limoe.train_command`) checks the settings, the inputs and, on a GPU, the memory plan
(`limoe plan`) before the workdir is touched. What is optimised is the objective's
(`limoe.training.objectives`): the module the engine wraps, which also supplies each step (its
data, its forwards and backwards) and its learning-rate scale, so the loop is the same for
contrastive training, co-training (`tasks:`) and `limoe pretrain`'s masked modelling, and never
asks which one it runs.

The loop never waits on the device except on logging, checkpoint and evaluation steps (and every
step in skip_nonfinite_steps mode): batches arrive as uint8, copied ahead of the step that uses them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Optional, Protocol

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import Tensor, nn

from limoe.checkpoints import training as checkpoint
from limoe.checkpoints.warm_start import warm_start
from limoe.config import Config, dump_config
from limoe.data.pipeline import LocalBatch
from limoe.distributed import ExpertSharding, any_process
from limoe.errors import LimoeError
from limoe.files import atomic_write
from limoe.model.tower import Limoe, build_model
from limoe.training.batches import micro_batch_size
from limoe.training.deepspeed_config import deepspeed_config
from limoe.training.device_batches import WaitClock
from limoe.training.evaluation import evaluate_live
from limoe.training.objectives import ObjectiveOutput, StepSource, objective_for
from limoe.training.progress import TrainingReporter
from limoe.training.session import Session
from limoe.training.step import StepOutcome
from limoe.training.workdir import check_same_architecture, evaluated_steps, keep_metrics_until

log = logging.getLogger(__name__)
MAX_SKIPS_IN_A_ROW = 20  # with skip_nonfinite_steps: this many bad steps in a row means divergence
FinalReport = Callable[[Path, Config, Path], dict]  # (exported model file, config, workdir) → metrics


class Objective(Protocol):
    """What a run optimises, and everything the loop and its command ask of it
    (`limoe.training.objectives` has the implementations and how one is chosen).

    Before anything is built (classmethods, on the settings): `check(config, world_size)` refuses,
    with one sentence, settings and inputs the objective cannot train on with `world_size`
    processes; `local_batches(config, world_size)` are the batches one process's loaders load, one
    per loader (the host-memory check sizes the data workers by them).

    Built as `objective(model, config)`, it is the module DeepSpeed wraps:
    `objective(images, tokens, step)` → ObjectiveOutput (loss, its parts detached, the MoE layers'
    routing); `stage(step)` names the phase a step belongs to, so routing statistics are kept apart
    per phase (None: one phase); `lr_scale(step)` multiplies the schedule's learning rate at `step`.
    All depend on the step alone, so a resumed run continues exactly. `steps(engine, config,
    session, start, clock)` is the loop's step source: its data (resumed at `start`; `clock` adds
    up the waits for batches) and a function that trains one optimizer step.
    `name` is saved with each checkpoint, so a workdir resumes only under its own objective.
    `model` is the `Limoe` being trained: exports keep it and drop everything else.
    `clamp_temperatures()` runs after every update and keeps the learned temperatures in bounds.
    """

    name: str
    model: Limoe

    @classmethod
    def check(cls, config: Config, world_size: int) -> None: ...

    @classmethod
    def local_batches(cls, config: Config, world_size: int) -> list[LocalBatch]: ...

    def __call__(self, images: Tensor, tokens: Tensor, step: int) -> ObjectiveOutput: ...

    def stage(self, step: int) -> Optional[str]: ...

    def lr_scale(self, step: int) -> float: ...

    def steps(self, engine, config: Config, session: Session, start: int, clock: WaitClock) -> StepSource: ...

    def clamp_temperatures(self) -> None: ...


def _no_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Decayed: the kernels (matrices) of linear and convolution layers, as vmoe decays `.*/kernel`.
    Not decayed: norms, biases, the token embedding, positions, pooling probes and the logit scale."""
    return parameter.ndim < 2 or any(word in name for word in ("token_embed", "positions", "probe", "cls_token", "logit"))


def optimizer_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups with and without decay, split again by DeepSpeed into shared and expert groups.

    torch's AdamW decays by lr(t) · weight_decay · θ per step, which is how vmoe applies its
    "decoupled" weight decay (optax: scale_by_adam, add_decayed_weights(wd), scale(−lr(t))); so a
    paper value such as 0.1 is used as it is.
    """
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        (no_decay if _no_weight_decay(name, parameter) else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


def lr_multiplier(step: int, config: Config) -> float:
    """Linear warmup to 1, then cosine or linear decay to min_lr / lr at the last step."""
    optim, total = config.optim, config.train.steps
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min((step - optim.warmup_steps) / max(total - optim.warmup_steps, 1), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
    floor = optim.min_lr / optim.lr
    return floor + (1 - floor) * shape


def build_engine(config: Config, session: Session, compile_backend: str = "inductor",
                 objective: Optional[type[Objective]] = None, warm: bool = False):
    """The model (this rank's experts), `objective` around it, optimizer and schedule inside a DeepSpeed engine.

    `objective` None: `limoe train`'s for this config (`limoe.training.objectives.objective_for`),
    for callers that build an engine without running the command (benchmarks, tests).

    `warm`: train.init_from's weights are loaded into the fresh model before the engine copies it
    (ZeRO keeps its own fp32 partitions, so they must be in place before `deepspeed.initialize`).

    With train.compile the tower is compiled (`compile_backend`, Inductor by default), the
    expert all-to-all inside its graph; the contrastive loss, whose feature gather breaks graphs,
    and the optimizer stay eager. Each step's learning rate is the schedule's times the objective's
    `lr_scale(step)` (co-training: the lr_scale of the task the schedule runs then).
    """
    micro_batch_size(config, session.world_size)  # a bad micro-batch size fails before anything is built
    ds_config = deepspeed_config(config, session.world_size, session.bf16)
    torch.manual_seed(config.train.seed)  # same dense weights on every rank; experts by global index
    sharding = ExpertSharding.for_process(config.distributed.expert_parallel_size)
    model = build_model(config, sharding)
    if warm:
        warm_start(model, config)
    model.set_activation_checkpointing(config.train.activation_checkpointing)
    module = (objective or objective_for(config))(model, config)
    optimizer = torch.optim.AdamW(
        optimizer_groups(module, config.optim.weight_decay), lr=config.optim.lr,
        betas=tuple(config.optim.betas), eps=config.optim.eps,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, config) * module.lr_scale(step))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    if config.train.compile:
        engine.module.model.compile(backend=compile_backend)
    return engine


def train_in_workdir(config: Config, workdir: Path, session: Session, objective: type[Objective],
                     report: Optional[FinalReport]) -> dict:
    """Train (or resume) in `workdir`, which this process has locked, with checked settings; returns
    the final held-out metrics (on rank 0)."""
    resume = checkpoint.find_resume_checkpoint(workdir)
    if resume is not None:
        check_same_architecture(checkpoint.checkpoint_config(resume).model, config.model, resume.path)
        checkpoint.check_same_objective(resume, objective.name)
    if session.rank == 0:
        atomic_write(workdir / "config.yaml", lambda tmp: dump_config(config, tmp))
    # train.init_from seeds a fresh run only; a resumed one continues from its own checkpoint
    warm = resume is None and config.train.init_from is not None
    engine = build_engine(config, session, objective=objective, warm=warm)
    state = (checkpoint.restore_training_checkpoint(engine, resume, config) if resume is not None
             else {"step": 0, "pairs_seen": 0})
    start = state["step"]
    if session.rank == 0:
        keep_metrics_until(workdir, start)
    if start >= config.train.steps:
        log.info("%s already reached step %d of %d", workdir, start, config.train.steps)
    data_clock = WaitClock()
    run_step, bad_samples = engine.module.steps(engine, config, session, start, data_clock)
    # Checkpoints written before pairs were counted: assume today's batch size throughout.
    pairs_seen = state.get("pairs_seen", start * config.train.batch_size)
    with TrainingReporter(config, workdir, session.rank, start, pairs_seen, state.get("tasks", {}),
                          data_clock) as reporter:
        if resume is not None:
            _evaluate_if_unrecorded(engine, config, workdir, session, reporter, start)
        _loop(engine, run_step, bad_samples, config, workdir, reporter, start)
        reporter.close_bar()
        metrics = finish(config, workdir, session, report)
        reporter.final(metrics)
    return metrics


def evaluation_due(step: int, config: Config) -> bool:
    """Whether evaluation during training runs after `step`: every train.eval_every steps and at the last."""
    return bool(config.train.eval_every) and (step % config.train.eval_every == 0 or step == config.train.steps)


def _evaluate_if_unrecorded(engine, config: Config, workdir: Path, session: Session, reporter, step: int) -> None:
    """Evaluate the resumed checkpoint's own step when its evaluation was due and metrics.jsonl has no
    record of it: a kill after the checkpoint was published and before the evaluation was written
    leaves exactly that. The model loaded is that step's, so its numbers are what the killed run
    would have logged; earlier steps' models are gone, so a missing earlier record stays missing."""
    if not evaluation_due(step, config):
        return
    if any_process(session.rank == 0 and step not in evaluated_steps(workdir)):
        log.warning("step %d: its evaluation was not recorded before the run stopped; evaluating it now", step)
        reporter.evaluation(step, evaluate_live(engine.module.model, config))


def _loop(engine, run_step: Callable[[int], StepOutcome], bad_samples, config: Config, workdir: Path, reporter,
          start: int) -> None:
    step, skipped_in_a_row = start, 0
    while step < config.train.steps:
        outcome = run_step(step)
        terms = outcome.terms
        if not outcome.stepped:
            skipped_in_a_row += 1
            reporter.skipped(step)
            if skipped_in_a_row == MAX_SKIPS_IN_A_ROW:
                raise LimoeError(f"{MAX_SKIPS_IN_A_ROW} steps in a row had a non-finite loss after step {step}; the "
                                 f"model has diverged. Lower optim.lr and resume from {workdir}.")
            continue
        stage = engine.module.stage(step)
        step, skipped_in_a_row = step + 1, 0
        reporter.step(step, outcome, engine.get_lr()[0], bad_samples, stage)
        checkpoint_due = step % config.train.checkpoint_every == 0 or step == config.train.steps
        if checkpoint_due or step % config.train.log_every == 0:
            _stop_if_nonfinite(terms, step, workdir)
        if checkpoint_due:
            checkpoint.save_training_checkpoint(engine, workdir, step, config, reporter.progress(), engine.module.name)
        if evaluation_due(step, config):
            reporter.evaluation(step, evaluate_live(engine.module.model, config))


def _stop_if_nonfinite(terms: dict[str, Tensor], step: int, workdir: Path) -> None:
    """Never checkpoint a diverged model: stop with the last good checkpoint left in place."""
    if not torch.isfinite(terms["loss"]).item():
        last = checkpoint.latest_checkpoint(workdir)
        raise LimoeError(
            f"the loss became {terms['loss'].item()} by step {step}; the last good checkpoint is "
            f"{last or 'none'}. Lower optim.lr or set train.skip_nonfinite_steps=true, then re-run to resume."
        )


def finish(config: Config, workdir: Path, session: Session, report: Optional[FinalReport] = None) -> dict:
    """Export the model, then (rank 0) the final report: by default held-out retrieval and a routing summary."""
    from limoe.training.final_report import final_report

    output = workdir / "model.safetensors"
    if session.rank == 0:
        checkpoint.export_workdir(workdir, output)
        metrics = (report or final_report)(output, config, workdir)
    else:
        metrics = {}
    dist.barrier()
    return metrics
