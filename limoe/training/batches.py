"""How a global batch splits over the processes and into micro-batches, checked before anything is built.

Pure arithmetic on the config: `limoe train` checks its batch sizes with it before the workdir is
touched, each step uses it to cut the per-GPU batch, and `limoe plan` uses it to size the steps it
plans, so both refuse the same settings with the same sentence. A per-GPU batch, and a micro-batch,
must hold whole routing groups (model.moe.group_size) to route as the configured groups do.
"""

from __future__ import annotations

import math

from limoe.config import Config
from limoe.errors import LimoeError
from limoe.model.routing import Grouping


def micro_batch_size(config: Config, world_size: int) -> int:
    """Pairs per GPU per forward: train.micro_batch_size, checked; the whole per-GPU batch by default."""
    batch = config.train.batch_size
    if batch % world_size:
        raise LimoeError(f"train.batch_size {batch} is not divisible by the {world_size} processes; "
                         f"pick a global batch that splits evenly.")
    local = batch // world_size
    check_whole_groups(local, f"train.batch_size {batch}", config, world_size)
    micro = config.train.micro_batch_size
    if micro is None:
        return local
    if micro < 1 or local % micro:
        divisors = [d for d in range(1, local + 1) if local % d == 0 and d % _whole_groups(config) == 0]
        raise LimoeError(f"train.micro_batch_size {micro} does not divide the {local} pairs per GPU (train.batch_size "
                         f"{batch} / {world_size} processes); use a divisor such as {_some(divisors)}.")
    group = _whole_groups(config)
    if micro % group:
        raise LimoeError(f"train.micro_batch_size {micro} is not a multiple of model.moe.group_size {group}: a "
                         f"micro-batch must hold whole routing groups to route as the full batch does.")
    return micro


def check_whole_groups(local: int, batch: str, config: Config, world_size: int) -> None:
    """Refuse a per-GPU batch of `local` examples (`batch` names the setting) that is not whole routing
    groups: the MoE layers would spread it evenly over smaller groups (`Grouping`), padded with empty
    examples where it does not divide, so tokens would compete for capacity in groups of another size
    than model.moe.group_size, silently."""
    group = _whole_groups(config)
    if local % group:
        grouping = Grouping.for_batch(local, group)
        pad = grouping.padded_batch - local
        padding = f" with {pad} empty examples as padding" if pad else ""
        lower, upper = (local // group) * group * world_size, (local // group + 1) * group * world_size
        such_as = f"{lower} or {upper}" if lower else f"{upper}"
        raise LimoeError(f"{batch} gives {local} examples per GPU, not a multiple of model.moe.group_size {group}: "
                         f"they would be routed in {grouping.num_groups} groups of {grouping.per_group}{padding}. "
                         f"Use a multiple of {group * world_size} such as {such_as}.")


def _whole_groups(config: Config) -> int:
    """A micro-batch holds a multiple of this many examples (the routing group; 1 for a dense model)."""
    return config.model.moe.group_size if config.model.moe_layers else 1


def _some(values: list[int]) -> str:
    return ", ".join(map(str, values[-4:])) if values else "the whole per-GPU batch"


def check_task_batches(config: Config, world_size: int) -> None:
    """Every task's batch splits over the processes, a contrastive task's into whole routing groups,
    and into micro-batches where it may."""
    for task in config.tasks:
        batch_size = config.task_batch_size(task)
        if batch_size % world_size:
            raise LimoeError(
                f"task '{task.name}': batch_size {batch_size} does not split over the {world_size} processes; "
                f"give it a multiple of {world_size}."
            )
    for task in config.tasks:
        batch_size = config.task_batch_size(task)
        if task.kind == "contrastive":
            check_whole_groups(batch_size // world_size, f"task '{task.name}': batch_size {batch_size}", config,
                               world_size)
        micro = config.train.micro_batch_size
        if micro is not None and task.kind == "classification":
            raise LimoeError(
                f"task '{task.name}': train.micro_batch_size applies to contrastive tasks only, and a classification "
                f"batch is encoded whole; remove train.micro_batch_size or lower the task's batch_size instead."
            )
        if micro is not None and (batch_size // world_size) % micro:
            raise LimoeError(
                f"task '{task.name}': train.micro_batch_size {micro} does not divide its {batch_size // world_size} "
                f"pairs per process; give the task a batch_size that is a multiple of {micro * world_size}."
            )


def prompts_per_process(count: int, world: int) -> int:
    """How many of `count` prompts each of `world` data-parallel ranks encodes (equal slices)."""
    return math.ceil(count / world)
