"""`limoe train`: contrastive training inside the DeepSpeed engine, with expert parallelism.

The same code runs as one CPU process and as many GPU processes under `deepspeed` or
`torchrun`. DeepSpeed owns the process groups, the optimizer step, gradient reduction (expert
gradients over the expert-data-parallel group only), clipping, ZeRO and checkpoints; this module
builds the pieces, runs the loop, and reports.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import Tensor, nn
from torch.nn.utils import get_total_norm

from limoe.checkpoints import training as checkpoint
from limoe.checkpoints.warm_start import warm_start
from limoe.config import Config, dump_config, load_config, to_dict
from limoe.data.pipeline import expand_shards, train_loader
from limoe.distributed import ExpertSharding, expert_parallel_group, init_process_group, resolve_device
from limoe.errors import LimoeError
from limoe.files import atomic_write
from limoe.training.losses import ContrastiveLoss, auxiliary_loss, clamp_logit_scale
from limoe.model.tower import Limoe
from limoe.training.flip import PatchDropping
from limoe.training.progress import TrainingReporter

log = logging.getLogger("limoe.training.trainer")
MAX_SKIPS_IN_A_ROW = 20  # with skip_nonfinite_steps: this many bad steps in a row means divergence
FinalReport = Callable[[Path, Config, Path], dict]  # (exported model file, config, workdir) → metrics


class Objective(Protocol):
    """What a run optimises: the module DeepSpeed wraps, built as `objective(model, config)`.

    `forward(images, tokens, step)` → (loss, its parts detached, the MoE layers' routing);
    `stage(step)` names the phase a step belongs to, so routing statistics are kept apart per
    phase (None: one phase). Both depend on the step alone, so a resumed run continues exactly.
    `model` is the `Limoe` being trained: checkpoints export it and drop everything else.
    """

    model: Limoe

    def __call__(self, images: Tensor, tokens: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor], list]: ...

    def stage(self, step: int) -> Optional[str]: ...


class ContrastiveTrainer(nn.Module):
    """The module DeepSpeed wraps: model + contrastive loss (+ SigLIP bias) → loss and its parts.

    With `train.image_mask_ratio` > 0 it is FLIP: each image enters the tower with a random share
    of its patches dropped, until the last `train.unmasked_steps` steps; evaluation never masks.
    """

    def __init__(self, model: Limoe, config: Config):
        super().__init__()
        self.model = model
        self.contrastive = ContrastiveLoss(config.loss.contrastive)
        self.loss_config = config.loss
        self.patch_dropping = PatchDropping.from_config(config)

    def stage(self, step: int) -> Optional[str]:
        return self.patch_dropping.stage(step)

    def forward(self, images: Tensor, tokens: Tensor, step: int = 0) -> tuple[Tensor, dict[str, Tensor], list]:
        keep = self.patch_dropping.keep(images, step) if self.training else None  # evaluation sees every patch
        output = self.model(images, tokens, keep)
        contrastive = self.contrastive(output.image_features, output.text_features, output.logit_scale)
        aux, parts = auxiliary_loss(output.routing, self.loss_config, contrastive.device)
        loss = contrastive + aux
        terms = {"loss": loss, "contrastive": contrastive, "auxiliary": aux, **parts,
                 "logit_scale": output.logit_scale.exp()}
        return loss, {k: v.detach().float() for k, v in terms.items()}, output.routing


def _no_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Norms, biases, embeddings, positions, pooling probes and the logit scale are not decayed."""
    return parameter.ndim < 2 or any(word in name for word in ("embed", "positions", "probe", "cls_token", "logit"))


def optimizer_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups with and without decay, split again by DeepSpeed into shared and expert groups."""
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


def deepspeed_config(config: Config, world_size: int, bf16: bool) -> dict:
    if config.train.batch_size % world_size:
        raise LimoeError(
            f"train.batch_size {config.train.batch_size} is not divisible by the {world_size} processes; "
            f"pick a global batch that splits evenly."
        )
    return {
        "train_batch_size": config.train.batch_size,
        "train_micro_batch_size_per_gpu": config.train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        # Without ZeRO, `clip_gradients` clips by the true global norm (DeepSpeed's own clipping
        # averages per-rank norms under EP); ZeRO partitions the gradients, so its optimizer clips.
        "gradient_clipping": config.optim.grad_clip if config.distributed.zero_stage else 0.0,
        "zero_optimization": {"stage": config.distributed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 2**62,
    }


@dataclass
class Session:
    """Where this process runs: device, precision, rank and world."""

    device: torch.device
    bf16: bool
    rank: int
    world_size: int


def start_session(config: Config) -> Session:
    """Join (or create) the process group and pick device and precision from the config."""
    cuda = resolve_device(config.train.device, option="train.device") == "cuda"
    rank, world_size, local_rank = init_process_group("nccl" if cuda else "gloo", config.distributed.timeout_minutes)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and cuda)
    if world_size % config.distributed.expert_parallel_size:
        raise LimoeError(
            f"distributed.expert_parallel_size {config.distributed.expert_parallel_size} does not divide the "
            f"{world_size} processes."
        )
    return Session(device, bf16, rank, world_size)


def build_engine(config: Config, session: Session, objective: type[Objective] = ContrastiveTrainer,
                 init_from: Optional[str] = None):
    """The model (this rank's experts), optimizer and schedule inside a DeepSpeed engine.

    `init_from`: weights loaded into the fresh model before the engine copies it (ZeRO keeps its
    own fp32 partitions, so they must be in place before `deepspeed.initialize`).
    """
    torch.manual_seed(config.train.seed)  # same dense weights on every rank; experts by global index
    sharding = ExpertSharding.for_process(config.distributed.expert_parallel_size)
    model = Limoe(config.model, config.loss.logit_scale_init, sharding)
    if init_from is not None:
        warm_start(model, Path(init_from))
    module = objective(model, config)
    optimizer = torch.optim.AdamW(
        optimizer_groups(module, config.optim.weight_decay), lr=config.optim.lr,
        betas=tuple(config.optim.betas), eps=config.optim.eps,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(config, session.world_size, session.bf16),
    )
    return engine


def global_grad_norm(module: nn.Module, expert_group) -> Tensor:
    """The 2-norm of the whole model's gradient, every expert counted once.

    After DeepSpeed's reduction the shared gradients are equal on all ranks, while each
    expert-parallel rank holds the gradients of its own experts; so the squared expert norms
    are summed over the expert-parallel group and added to the shared part once. (DeepSpeed's
    own clipping averages the per-rank norms, which is not the global norm with experts sharded.)
    """
    shared, experts = [], []
    for parameter in module.parameters():
        if parameter.grad is not None:
            (experts if is_moe_param(parameter) else shared).append(parameter.grad.detach())
    device = next(module.parameters()).device
    shared_squared = get_total_norm(shared).to(device).pow(2) if shared else torch.zeros((), device=device)
    experts_squared = get_total_norm(experts).to(device).pow(2) if experts else torch.zeros((), device=device)
    if expert_group is not None:
        dist.all_reduce(experts_squared, group=expert_group)
    return (shared_squared + experts_squared).sqrt()


def clip_gradients(engine, max_norm: float, expert_group) -> Tensor:
    """Scale all gradients so their global norm is at most `max_norm`; returns the norm before."""
    norm = global_grad_norm(engine.module, expert_group)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(engine.module.parameters(), max_norm, norm)
    return norm


def _finite_everywhere(loss: Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks must agree to skip a step together)."""
    finite = torch.isfinite(loss).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_step(engine, images: Tensor, tokens: Tensor, config: Config,
               step: int = 0) -> tuple[dict[str, Tensor], list, bool]:
    """Forward, backward, clip, optimizer step; returns the loss terms, routing, and whether it stepped.

    `step` (0-based, the number of updates so far) picks what the objective does: its stage and masks.
    Only the skip-on-NaN mode looks at the loss value before stepping (a host sync per step).
    """
    loss, terms, routing = engine(images, tokens, step)
    if config.train.skip_nonfinite_steps and not _finite_everywhere(loss):
        engine.zero_grad()
        return terms, routing, False
    engine.backward(loss)
    if not config.distributed.zero_stage:
        terms["grad_norm"] = clip_gradients(engine, config.optim.grad_clip, expert_parallel_group(config))
    engine.step()
    clamp_logit_scale(engine.module.model.logit_scale)
    return terms, routing, True


def _check_workdir(workdir: Path, config: Config) -> None:
    """A workdir belongs to one architecture; its saved config must match this run's model."""
    saved = workdir / "config.yaml"
    if checkpoint.latest_checkpoint(workdir) is None or not saved.exists():
        return
    previous = load_config(str(saved))
    if previous.model != config.model:
        raise LimoeError(
            f"{workdir} holds a checkpoint of a different architecture ({previous.model.name}, width "
            f"{previous.model.width}, depth {previous.model.depth}); use a new --workdir or the same model config."
        )


def train(config: Config, workdir: Path, objective: type[Objective] = ContrastiveTrainer,
          report: Optional[FinalReport] = None) -> dict:
    """Train (or resume) in `workdir`; returns the final held-out metrics (on rank 0).

    `objective` is what is optimised (contrastive training by default; `limoe pretrain` passes
    its masked-modelling objective) and `report` what is measured at the end (default: held-out
    retrieval and routing of the exported model).
    """
    for source in config.data.train:  # a missing shard path fails here, before anything is built
        expand_shards(source.shards)
    session = start_session(config)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir(workdir, config)
    fresh = checkpoint.latest_checkpoint(workdir) is None  # train.init_from seeds a fresh run only
    engine = build_engine(config, session, objective, config.train.init_from if fresh else None)
    state = checkpoint.load_training_checkpoint(engine, workdir) or {"step": 0}
    if session.rank == 0:  # after the checkpoint was found to fit: a refused run leaves the workdir as it was
        atomic_write(workdir / "config.yaml", lambda tmp: dump_config(config, tmp))
    start = state["step"]
    if start >= config.train.steps:
        log.info("%s already reached step %d of %d", workdir, start, config.train.steps)
    loader = train_loader(
        config.data.train, config.train.batch_size // session.world_size, config.model.image_size,
        config.model.context_length, config.data.workers, config.data.shuffle_buffer, config.data.resampled,
        seed=config.train.seed + 1_000_003 * start, max_bad_fraction=config.data.max_bad_fraction,
        pin_memory=session.device.type == "cuda",
    )
    reporter = TrainingReporter(config, workdir, session.rank, start)
    _loop(engine, loader, config, session, workdir, reporter, start)
    reporter.close()
    return finish(config, workdir, session, report)


def _loop(engine, loader, config: Config, session: Session, workdir: Path, reporter, start: int) -> None:
    step, skipped_in_a_row = start, 0
    batches = iter(loader)
    while step < config.train.steps:
        images, tokens = next(batches)
        images = images.to(session.device, non_blocking=True)
        tokens = tokens.to(session.device, non_blocking=True)
        terms, routing, stepped = train_step(engine, images, tokens, config, step)
        if not stepped:
            skipped_in_a_row += 1
            reporter.skipped(step)
            if skipped_in_a_row == MAX_SKIPS_IN_A_ROW:
                raise LimoeError(f"{MAX_SKIPS_IN_A_ROW} steps in a row had a non-finite loss after step {step}; the "
                                 f"model has diverged. Lower optim.lr and resume from {workdir}.")
            continue
        stage = engine.module.stage(step)
        step, skipped_in_a_row = step + 1, 0
        reporter.step(step, terms, routing, engine.get_lr()[0], loader.bad_samples, images.shape[0] * session.world_size,
                      stage)
        checkpoint_due = step % config.train.checkpoint_every == 0 or step == config.train.steps
        if checkpoint_due or step % config.train.log_every == 0:
            _stop_if_nonfinite(terms, step, workdir)
        if checkpoint_due:
            checkpoint.save_training_checkpoint(
                engine, workdir, step, {"step": step, "config": to_dict(config)}, config.train.keep_checkpoints
            )


def _stop_if_nonfinite(terms: dict[str, Tensor], step: int, workdir: Path) -> None:
    """Never checkpoint a diverged model: stop with the last good checkpoint left in place."""
    if not torch.isfinite(terms["loss"]).item():
        last = checkpoint.latest_checkpoint(workdir)
        raise LimoeError(
            f"the loss became {terms['loss'].item()} by step {step}; the last good checkpoint is "
            f"{last or 'none'}. Lower optim.lr or set train.skip_nonfinite_steps=true, then re-run to resume."
        )


def finish(config: Config, workdir: Path, session: Session, report: Optional[FinalReport] = None) -> dict:
    """Export the model, then (rank 0) the final report: by default held-out retrieval and routing."""
    from limoe.training.final_report import final_report

    output = workdir / "model.safetensors"
    if session.rank == 0:
        checkpoint.export_workdir(workdir, output)
        metrics = (report or final_report)(output, config, workdir)
    else:
        metrics = {}
    dist.barrier()
    return metrics
