"""Co-training one model on several datasets (PolyViT), classification included (Uni-Perceiver).

`tasks:` in the config lists the datasets; each becomes a `Task` here: its loader, and what one of
its batches feeds the model. The schedule (`limoe.training.schedules`) names each step's task; it
is a pure function of (seed, step), so every rank runs the same task with the same shapes and the
expert all-to-all always pairs up. A step of one task is a forward through `CoTrainingObjective`
(`limoe.training.objectives`, the module DeepSpeed wraps), a backward of the task's loss times its
`loss_weight`, and an update whose learning rate is the schedule's times the task's `lr_scale`
(PolyViT's `lr_coefs`). `accumulate` runs one batch of every task, sums their gradients, then
updates once.

A task's `modalities` say what its shards hold: image–, audio– or video–caption pairs (or labelled
images, audio clips or video clips). A contrastive task trains exactly as `limoe train` without tasks does (through
`limoe.training.step`, micro-batches included), on its own pair of modalities; a classification
task scores its images or clips against its class names' prompts (`limoe.training.candidates`),
its batch taken whole. A task's loss
includes the auxiliary routing losses of its own forward passes.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from limoe.config import Config, ShardSource, TaskConfig
from limoe.data.pipeline import ShardLoader, expand_shards, require_labels
from limoe.errors import LimoeError
from limoe.prompt_templates import load_templates
from limoe.training.batches import check_task_batches
from limoe.training.candidates import candidate_subset, positions, prompt_rows, prompt_tokens, task_classnames
from limoe.training.device_batches import DeviceBatches, WaitClock
from limoe.training.loaders import SEED_STRIDE, train_loader_for
from limoe.training.losses import without_absent_modalities
from limoe.training.schedules import TaskSchedule
from limoe.training.session import Session
from limoe.training.step import StepOutcome, apply_update, forward_backward, whole_batch_backward

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Tasks: a loader and the gradient of one of its batches


class Task:
    """One dataset of a co-training run, as the loop sees it: pairs of the task's modalities (images,
    audio or video clips, and captions)."""

    def __init__(self, config: TaskConfig, loader: ShardLoader, device: torch.device,
                 clock: Optional[WaitClock] = None):
        self.config = config
        self.loader = loader
        self._batches = iter(DeviceBatches(loader, device, clock))

    @property
    def name(self) -> str:
        return self.config.name

    def backward(self, engine, step: int, config: Config, last: bool) -> tuple[dict[str, Tensor], list, bool, int]:
        """Gradient of this task's next batch, times its loss weight, at optimizer step `step`:
        (terms, routing of each forward pass, whether the loss was finite, samples on this rank)."""
        inputs, tokens = next(self._batches)
        terms, routing, finite = forward_backward(engine, inputs, tokens, config, step, self.config.loss_weight, last,
                                                  self.config.modalities)
        return terms, [routing], finite, inputs.shape[0]


class ClassificationTask(Task):
    """Labelled images, audio or video clips scored against class-name prompts: all classes, or N that include
    the labels."""

    def __init__(self, config: TaskConfig, loader: ShardLoader, device: torch.device, classnames: list[str],
                 prompts: Tensor, templates: int, seed: int, clock: Optional[WaitClock] = None):
        super().__init__(config, loader, device, clock)
        self.classnames = classnames
        self.prompts = prompts  # [C·T, L] every class's prompts, class-major, on the device
        self.templates = templates  # T, prompts per class
        self.seed = seed  # for drawing the other candidates (the schedule's seed: the same on every rank)

    def backward(self, engine, step: int, config: Config, last: bool) -> tuple[dict[str, Tensor], list, bool, int]:
        inputs, labels = next(self._batches)
        self._check(labels)
        targets, prompts = labels, self.prompts
        if self.config.candidates != "all":
            everyone = _gather(labels)  # the candidates must be the same on every rank
            generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + step)
            classes = candidate_subset(everyone, len(self.classnames), self.config.candidates, generator)
            classes = classes.to(labels.device)
            targets, prompts = positions(classes, labels), self.prompts[prompt_rows(classes, self.templates)]
        terms, calls, finite = whole_batch_backward(
            engine, (inputs, targets, step, None, prompts, self.templates, self.config.modalities), config,
            self.config.loss_weight, last)
        return terms, calls, finite, inputs.shape[0]

    def _check(self, labels: Tensor) -> None:
        outside = (labels < 0) | (labels >= len(self.classnames))
        if outside.any():
            raise LimoeError(
                f"task '{self.name}': a sample of {self.config.data} has label {labels[outside][0].item()}, outside "
                f"its {len(self.classnames)} class names; give the task the shards' own classnames file."
            )


def _gather(labels: Tensor) -> Tensor:
    """Every data-parallel rank's labels [W·B] (ranks hold equal batches)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return labels
    gathered = torch.empty(dist.get_world_size() * labels.numel(), dtype=labels.dtype, device=labels.device)
    dist.all_gather_into_tensor(gathered, labels)
    return gathered


TRAINED_INPUTS = ("image", "audio", "video")  # what a task's shards can hold beside captions (the loaders read them all)


def check_tasks(config: Config, world_size: int) -> None:
    """Every task's input, before anything is built: modalities, batch split, shards, labels, class
    names, templates."""
    check_task_batches(config, world_size)
    for task in config.tasks:
        _check_modalities(task)
        expand_shards(task.data)
        if task.kind == "classification":
            require_labels(task.data)
            task_classnames(task)
            load_templates(task.templates)


def _check_modalities(task: TaskConfig) -> None:
    """A task trains inputs read from shards (images, audio or video) against text: captions, or class prompts."""
    inputs, other = task.modalities
    if inputs not in TRAINED_INPUTS or other != "text":
        raise LimoeError(f"task '{task.name}': tasks[].modalities {list(task.modalities)} cannot be trained; a task "
                         f"pairs {', '.join(TRAINED_INPUTS[:-1])} or {TRAINED_INPUTS[-1]} with text, e.g. [audio, text].")


def build_tasks(config: Config, world_size: int, device: torch.device, start: int,
                clock: Optional[WaitClock] = None) -> list[Task]:
    """Every task's loader (reseeded for a resume at `start`) and, for classification, its prompts;
    `clock` adds up the time spent waiting for any task's batches."""
    tasks = []
    for index, task in enumerate(config.tasks):
        classification = task.kind == "classification"
        loader = train_loader_for(config, (ShardSource(task.data),), config.task_batch_size(task), world_size, device,
                                  start, stream=index, classification=classification, modality=task.modalities[0])
        if not classification:
            tasks.append(Task(task, loader, device, clock))
            continue
        classnames, templates = task_classnames(task), load_templates(task.templates)
        tokens = prompt_tokens(classnames, templates, config.model.context_length).to(device)
        tasks.append(ClassificationTask(task, loader, device, classnames, tokens, len(templates), config.schedule.seed,
                                          clock))
    return tasks


class BadSamplesOfAllTasks:
    """The loaders' skipped samples added up, in the shape the progress report reads."""

    def __init__(self, tasks: list[Task]):
        self.counters = [task.loader.bad_samples for task in tasks]

    @property
    def seen(self) -> int:
        return sum(counter.seen for counter in self.counters)

    @property
    def bad(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for counter in self.counters:
            for reason, count in counter.bad.items():
                totals[reason] = totals.get(reason, 0) + count
        return totals


# ---------------------------------------------------------------------------------------------
# The learning rate and one optimizer step


def lr_scale(config: Config) -> Callable[[int], float]:
    """step → the lr_scale of the task that step trains (1 for accumulate), for the LR schedule."""
    schedule = TaskSchedule.from_config(config)
    scales = [task.lr_scale for task in config.tasks]
    if schedule.accumulates:
        return lambda step: 1.0
    return lambda step: scales[schedule.tasks_at(min(step, schedule.total - 1))[0]]


def task_gradients(engine, tasks: list[Task], runs: tuple[int, ...], step: int, config: Config,
                   world_size: int) -> StepOutcome:
    """The gradients of the tasks in `runs` (one, or all for accumulate) at optimizer step `step`,
    summed, without the update. Only the last task's backward marks DeepSpeed's boundary, so the
    gradients are reduced over ranks once. A non-finite loss (skip_nonfinite_steps) drops them all.

    Terms: `loss`, the weighted sum that is optimised, and `<task>/<term>` for each task run (no
    per-modality routing terms of a modality the task does not feed the model).
    """
    terms, task_routing, task_samples = {}, [], {}
    total = 0.0
    for position, index in enumerate(runs):
        task = tasks[index]
        task_terms, calls, finite, images = task.backward(engine, step, config, last=position == len(runs) - 1)
        if not finite:
            engine.zero_grad()
            return StepOutcome({**terms, "loss": task_terms["loss"]}, False, 0, [])
        total = total + task.config.loss_weight * task_terms["loss"]
        reported = without_absent_modalities(task_terms, task.config.modalities, config.model.modalities)
        terms.update({f"{task.name}/{key}": value for key, value in reported.items()})
        task_routing += [(task.name, routing) for routing in calls]
        task_samples[task.name] = images * world_size
    terms["loss"] = total
    return StepOutcome(terms, True, sum(task_samples.values()), task_routing, task_samples)


def cotrain_step(engine, tasks: list[Task], runs: tuple[int, ...], step: int, config: Config,
                 world_size: int) -> StepOutcome:
    """Optimizer step `step`: the gradients of the tasks in `runs`, then one update."""
    outcome = task_gradients(engine, tasks, runs, step, config, world_size)
    if outcome.stepped:
        apply_update(engine, outcome.terms, config)
    return outcome


def task_steps(engine, config: Config, session: Session, start: int,
               clock: WaitClock) -> tuple[Callable[[int], StepOutcome], object]:
    """The training loop's step function for `tasks:` (resuming at `start`), and the bad-sample counts;
    `clock` adds up the time spent waiting for batches."""
    tasks = build_tasks(config, session.world_size, session.device, start, clock)
    schedule = TaskSchedule.from_config(config)
    if session.rank == 0:
        unit = "batches" if schedule.accumulates else "steps"
        log.info("schedule %s: %s", schedule.kind,
                 ", ".join(f"{task.name} {count} {unit}" for task, count in zip(tasks, schedule.counts())))

    def run(step: int) -> StepOutcome:
        return cotrain_step(engine, tasks, schedule.tasks_at(step), step, config, session.world_size)

    return run, BadSamplesOfAllTasks(tasks)
