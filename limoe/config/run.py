"""`Config`: a whole training run, composed of the sections, with the checks that span sections.

Each section checks its own keys when it is built; what only holds between sections (experts
divisible by the expert-parallel ranks, co-training tasks against the schedule and the run's
length, evaluation asked for with nothing to evaluate) is checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from limoe.config.data import DataConfig
from limoe.config.distributed import DistributedConfig
from limoe.config.evaluation import EvalConfig
from limoe.config.keys import setting
from limoe.config.loss import LossConfig
from limoe.config.model import ModelConfig
from limoe.config.optim import OptimConfig
from limoe.config.pretrain import PretrainConfig
from limoe.config.tasks import ScheduleConfig, TaskConfig
from limoe.config.training import TrainConfig
from limoe.errors import LimoeError


@dataclass(frozen=True)
class Config:
    """A training run: the model, its losses, the data, the optimizer, the run, its processes and what it
    evaluates while it trains."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tasks: tuple[TaskConfig, ...] = setting((), "co-training: the datasets and their objectives, with the keys "
                                                "below; empty: contrastive training on data.train")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        # the per-modality loss keys hold exactly the model's modalities, defaults filled in
        object.__setattr__(self, "loss", self.loss.for_modalities(self.model.modalities))
        audio_sets = self.eval.audio.sets
        if self.train.eval_every and self.eval.zeroshot.data is None and self.eval.retrieval is None and not audio_sets:
            raise LimoeError(f"train.eval_every is {self.train.eval_every} but there is nothing to evaluate; set "
                             f"eval.zeroshot.data or eval.retrieval (or their eval.audio twins), or train.eval_every=0.")
        if audio_sets and "audio" not in self.model.modalities:
            raise LimoeError(f"{audio_sets[0]} is set but model.modalities {list(self.model.modalities)} has no audio "
                             f"to evaluate; add audio to model.modalities or drop {audio_sets[0]}.")
        experts, shards = self.model.moe.num_experts, self.distributed.expert_parallel_size
        if self.model.moe_layers and experts % shards:
            raise LimoeError(f"model.moe.num_experts {experts} is not divisible by distributed.expert_parallel_size "
                             f"{shards}; every rank must hold the same number of experts.")
        if self.train.init_audio_patches_from_image and (self.train.init_from is None
                                                          or "audio" not in self.model.modalities):
            raise LimoeError("train.init_audio_patches_from_image starts the audio patch convolution of a model with "
                             "audio from train.init_from's image one; set train.init_from and include audio in "
                             "model.modalities, or drop it.")
        if self.train.init_video_from_image:
            self._check_video_from_image()
        for modality in ("audio", "video"):
            ratio = getattr(self.train, f"{modality}_mask_ratio")
            if ratio and modality not in self.model.modalities:
                raise LimoeError(f"train.{modality}_mask_ratio is {ratio} but model.modalities "
                                 f"{list(self.model.modalities)} has no {modality} to mask; add {modality} or drop it.")
        if self.tasks:
            self._check_tasks()

    def _check_video_from_image(self) -> None:
        model = self.model
        if self.train.init_from is None or not {"image", "video"} <= set(model.modalities):
            raise LimoeError("train.init_video_from_image starts the video tensors of a model with image and video "
                             "from train.init_from's image ones; set train.init_from and include image and video in "
                             "model.modalities, or drop it.")
        if model.video.pool != model.image_pool:
            raise LimoeError(f"train.init_video_from_image copies the image pooling head into the video one, but "
                             f"model.video.pool is {model.video.pool} and model.image_pool {model.image_pool}; make "
                             f"them equal or drop the option.")

    def _check_tasks(self) -> None:
        for task in self.tasks:
            self.check_embedded(task.modalities, f"task '{task.name}': tasks[].modalities", "the task's modalities")
        names = [task.name for task in self.tasks]
        if len(set(names)) < len(names) or any(not name or "/" in name for name in names):
            raise LimoeError(f"tasks: task names must be unique, non-empty and free of '/', got {names}.")
        kind = self.schedule.kind
        if kind in ("weighted", "task_by_task"):
            missing = [task.name for task in self.tasks if task.steps is None]
            if missing:
                raise LimoeError(f"schedule {kind} needs every task's steps (its step budget U_j); task "
                                 f"'{missing[0]}' has none.")
            total = sum(task.steps for task in self.tasks)
            if total != self.train.steps:
                raise LimoeError(
                    f"the tasks' steps add up to {total} but train.steps is {self.train.steps}; with schedule {kind} "
                    f"each task runs exactly its steps, so make train.steps their sum."
                )
        if kind == "accumulate" and any(task.lr_scale != 1.0 for task in self.tasks):
            raise LimoeError("schedule accumulate takes one optimizer step for all tasks together, so a task's "
                             "lr_scale cannot apply; weight the tasks with loss_weight instead.")

    def check_embedded(self, modalities: tuple[str, ...], key: str, choice: str) -> None:
        """Refuse, in one line naming `key`, a modality among `modalities` the model does not embed;
        `choice` is what the fix picks among the model's."""
        stray = [name for name in modalities if name not in self.model.modalities]
        if stray:
            raise LimoeError(f"{key} names '{stray[0]}', which is not one of model.modalities "
                             f"({', '.join(self.model.modalities)}); add it to the model or pick {choice} among them.")

    def task_batch_size(self, task: TaskConfig) -> int:
        """A task's global batch size (the train batch size unless the task sets its own)."""
        return task.batch_size if task.batch_size is not None else self.train.batch_size
