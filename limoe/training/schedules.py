"""Task schedules for co-training: which task(s) each optimizer step trains (PolyViT's five).

A schedule is a pure function of (seed, step): every rank computes the same task for every step
without talking to the others (the expert all-to-all needs all ranks in the same task, with the
same shapes), and a resumed run continues the sequence exactly where it stopped.

- `task_by_task`: task 1's U_1 steps, then task 2's U_2, … in a random task order. It forgets
  the early tasks, which is why PolyViT shows it.
- `alternating`: deterministic round robin, task (step mod T).
- `uniform`: every task equally often: ⌊U/T⌋ steps each (the first U mod T tasks one more),
  laid out and permuted once, so each step is task j with probability 1/T and the counts are exact.
- `weighted`: exactly U_j copies of task j, permuted once — PolyViT's released trainer builds
  its schedule this way, so counts are exact and all hosts agree.
- `accumulate`: every step runs one batch of every task and sums the gradients.

The one-off permutations use numpy's PCG64 generator seeded with `seed`, whose stream numpy keeps
stable across versions, so the same seed gives the same schedule on every host and release.
"""

from __future__ import annotations

import typing
from typing import Optional, Sequence

import numpy as np

from limoe.config import Config, ScheduleConfig

KINDS = typing.get_args(typing.get_type_hints(ScheduleConfig)["kind"])


class TaskSchedule:
    """The task indices each step runs: `tasks_at(step)` (one task, or all of them for accumulate).

    `budgets` are the tasks' U_j (needed by `weighted` and `task_by_task`), `total` the number of
    optimizer steps.
    """

    def __init__(self, kind: str, seed: int, num_tasks: int, total: int, budgets: Sequence[Optional[int]] = ()):
        if kind not in KINDS:
            raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(KINDS)}")
        self.kind = kind
        self.num_tasks = num_tasks
        self.total = total
        rng = np.random.default_rng(seed)
        self.order: Optional[np.ndarray] = None  # task per step, for the laid-out schedules
        if kind == "weighted":
            self.order = rng.permutation(np.repeat(np.arange(num_tasks), budgets))
        elif kind == "uniform":
            counts = [total // num_tasks + (j < total % num_tasks) for j in range(num_tasks)]
            self.order = rng.permutation(np.repeat(np.arange(num_tasks), counts))
        elif kind == "task_by_task":
            sequence = rng.permutation(num_tasks)
            self.order = np.repeat(sequence, [budgets[j] for j in sequence])
        if self.order is not None and len(self.order) != total:
            raise ValueError(f"the tasks' budgets add up to {len(self.order)} steps, not {total}")

    @classmethod
    def from_config(cls, config: Config) -> "TaskSchedule":
        return cls(config.schedule.kind, config.schedule.seed, len(config.tasks), config.train.steps,
                   [task.steps for task in config.tasks])

    @property
    def accumulates(self) -> bool:
        return self.kind == "accumulate"

    def tasks_at(self, step: int) -> tuple[int, ...]:
        """The tasks whose batches make up optimizer step `step` (0-based), in the order they run."""
        if self.kind == "accumulate":
            return tuple(range(self.num_tasks))
        if self.kind == "alternating":
            return (step % self.num_tasks,)
        return (int(self.order[step]),)

    def counts(self) -> list[int]:
        """How many steps each task runs in the whole schedule (batches, for accumulate)."""
        totals = [0] * self.num_tasks
        for step in range(self.total):
            for task in self.tasks_at(step):
                totals[task] += 1
        return totals
