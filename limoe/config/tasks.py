"""`tasks` and `schedule`: co-training on several datasets and objectives, and which one each step
trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from limoe.config.keys import setting
from limoe.errors import LimoeError
from limoe.modalities import DEFAULT_MODALITIES


@dataclass(frozen=True)
class TaskConfig:
    """One dataset and objective of a co-training run, with PolyViT's per-task settings.

    `contrastive`: image-, audio- or video-text pairs (`modalities`), the usual InfoNCE (or SigLIP) loss.
    `classification`: images or clips with `.cls` labels, scored against their class names' prompts
    encoded by the same tower
    (Uni-Perceiver); `candidates` is `all` (the whole label set every step) or a number N of
    classes that always includes the batch's labels.
    """

    name: str = setting(meaning="names the task in metrics and logs (`<name>/loss`)")
    kind: Literal["contrastive", "classification"] = setting(
        meaning="contrastive: caption shards (of images, audio or video, as modalities says); classification: shards with "
                ".cls labels")
    data: str = setting(meaning="shard spec, as for data.train")
    batch_size: Optional[int] = setting(None, "images per step of this task, summed over all data-parallel ranks; "
                                              "null: train.batch_size", "[1, 10000000]")
    steps: Optional[int] = setting(None, "U_j, this task's step budget; the weighted and task_by_task schedules "
                                         "run it exactly this often", "[1, inf)")
    lr_scale: float = setting(1.0, "PolyViT's lr_coefs: multiplies the learning rate of the steps that run this "
                                   "task", "(0, inf)")
    loss_weight: float = setting(1.0, "multiplies this task's loss, its routing losses included", "[0, inf)")
    classnames: Optional[str] = setting(None, "classification: class names, one per line in label order; null: "
                                              "classnames.txt beside the shards")
    templates: str = setting("simple", "classification: prompt templates, 'simple' (7), 'openai' (80), 'sounds' "
                                       "(for audio) or a file; every class's prompts are encoded every step")
    candidates: Union[Literal["all"], int] = setting(
        "all", "classification: score against all classes, or against N that always include the batch's labels",
        "[2, inf)")
    modalities: tuple[str, ...] = setting(
        DEFAULT_MODALITIES, "the task's two modalities, each one of model.modalities (contrastive: the two sides of "
                            "a pair; classification: the input's, then the class prompts')")

    def __post_init__(self):
        if len(self.modalities) != 2 or self.modalities[0] == self.modalities[1]:
            raise LimoeError(f"task '{self.name}': tasks[].modalities must name two different modalities, got "
                             f"{list(self.modalities)}.")


@dataclass(frozen=True)
class ScheduleConfig:
    """Which task each optimizer step trains (PolyViT's schedules); a pure function of (seed, step).

    task_by_task: every step of one task, then the next, in a random task order; alternating:
    round robin; uniform: every task equally often; weighted: task j exactly `steps` times; all
    three shuffled once with `seed`. accumulate: one batch of every task per step, gradients summed.
    """

    kind: Literal["task_by_task", "alternating", "uniform", "weighted", "accumulate"] = setting(
        "weighted", "co-training schedule: which task each step trains (docs/TRAINING.md)")
    seed: int = setting(0, "seeds the schedule's shuffles and the candidate draws", "[0, 4294967295]")
