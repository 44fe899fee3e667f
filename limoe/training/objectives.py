"""What a run optimises: the module the DeepSpeed engine wraps, and everything the loop asks of it.

An objective owns its run (open_clip's `TrainingTask`): the training loop (`limoe.training.trainer`)
and the command around it (`limoe.train_command`) only call what the `Objective` protocol names —
the checks of the settings against the process count before anything is built, the largest
per-process batch for the memory checks, the forward, the phase and learning-rate scale of each
step, and the step source that produces each optimizer step — and never ask which objective runs.

- `ContrastiveObjective` (`limoe train`): the model plus the contrastive loss, one batch of
  `data.train`'s pairs per step, with micro-batches by feature caching (`limoe.training.step`).
- `CoTrainingObjective` (`limoe train` with `tasks:`): the same plus classification; each step runs
  the tasks the schedule names (`limoe.training.cotraining`), at the learning rate scaled by the
  task's lr_scale.
- `MaskedPretraining` (`limoe pretrain`, in `limoe.pretraining.objective`): masked image (or
  audio) and language modelling on `data.train`'s pairs.

The objective is chosen once, where the run is started: `objective_for(config)` for `limoe train`,
`MaskedPretraining` by `limoe pretrain`. Each objective's `name` is saved with every checkpoint, so
a workdir resumes only under the objective that wrote it.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

from limoe.config import Config, LossConfig
from limoe.data.pipeline import LocalBatch, expand_shards
from limoe.data.preprocess import normalize
from limoe.errors import LimoeError
from limoe.modalities import DEFAULT_MODALITIES
from limoe.model.routing import LayerRouting
from limoe.model.tower import Limoe
from limoe.training.batches import micro_batch_size
from limoe.training.candidates import CandidateLoss, class_embeddings, encode_prompts
from limoe.training.cotraining import check_tasks, lr_scale, task_steps
from limoe.training.device_batches import DeviceBatches, WaitClock
from limoe.training.flip import MODALITIES as PATCH_MODALITIES, PatchDropping
from limoe.training.loaders import train_loader_for
from limoe.training.losses import ContrastiveLoss, auxiliary_loss, clamp_logit_scale
from limoe.training.session import Session
from limoe.training.step import MicroBatchShare, StepOutcome, detached, train_step

CONTRASTIVE = "contrastive"
COTRAINING = "co-training"


class ObjectiveOutput(NamedTuple):
    """What the engine's forward returns: what backward runs on, and what is reported."""

    objective: Tensor  # [] what backward runs on
    terms: dict[str, Tensor]  # the loss and its parts, detached
    routing: list  # the MoE layers' routing: list[LayerRouting], or one such list per forward pass (classification)


class StepSource(NamedTuple):
    """The training loop's view of its data: `run(step)` trains 0-based optimizer step `step` (one
    update, or none if skipped) and says what it did; `bad_samples` are the data loaders' skipped
    samples (`.seen`, `.bad`), read by the progress report."""

    run: Callable[[int], StepOutcome]
    bad_samples: object


class PairsObjective(nn.Module):
    """An objective trained on `data.train`'s pairs, one batch and one update per step, at the
    learning rate of the schedule (contrastive training and masked pretraining)."""

    @classmethod
    def pairs(cls, config: Config) -> tuple[str, ...]:
        """The modalities of `data.train`'s pairs: the inputs' (what the loader reads), the captions'."""
        return DEFAULT_MODALITIES

    @classmethod
    def check(cls, config: Config, world_size: int) -> None:
        """Before anything is built: `data.train`'s shards exist, and the batch splits over the
        `world_size` processes into whole routing groups (and micro-batches)."""
        for source in config.data.train:
            expand_shards(source.shards)
        micro_batch_size(config, world_size)

    @classmethod
    def local_batches(cls, config: Config, world_size: int) -> list[LocalBatch]:
        """The batch one process loads for a step: its share of train.batch_size's pairs."""
        return [LocalBatch("train.batch_size", config.train.batch_size // world_size, "image")]

    def lr_scale(self, step: int) -> float:
        """The factor on the schedule's learning rate at `step`: none."""
        return 1.0

    def steps(self, engine, config: Config, session: Session, start: int, clock: WaitClock) -> StepSource:
        """Each step one batch of `data.train` (the loader resumed at `start`; `clock` adds up the waits
        for batches) through `limoe.training.step.train_step`."""
        loader = train_loader_for(config, config.data.train, config.train.batch_size, session.world_size,
                                  session.device, start, modality=self.pairs(config)[0])
        batches = iter(DeviceBatches(loader, session.device, clock))

        def run(step: int) -> StepOutcome:
            images, tokens = next(batches)
            terms, routing, stepped = train_step(engine, images, tokens, config, step)
            return StepOutcome(terms, stepped, config.train.batch_size, [(None, routing)])

        return StepSource(run, loader.bad_samples)


class ContrastiveObjective(PairsObjective):
    """`limoe train`'s objective: model + contrastive loss.

    A batch is a pair of modalities, `modalities` = (the inputs', the captions'): image–text for
    `data.train`, a co-training task's `tasks[].modalities` (audio–text, video–text) otherwise; both sides go
    through the tower together and the loss contrasts their features.

    With `train.image_mask_ratio` > 0 it is FLIP: in training, each image enters the tower with a
    random share of its patches dropped, until the last `train.unmasked_steps` steps; with
    `train.audio_mask_ratio` > 0 each audio clip drops its own share of spectrogram patches alike, with
    `train.video_mask_ratio` > 0 each video clip its own share of tubes (`limoe.training.flip`).
    Images and video clips may come as uint8 (the training loader's; normalised here, on the
    device) or as normalised floats; audio comes as float waveforms.
    The engine's forward must produce what backward runs on (DeepSpeed hooks its gradient
    bookkeeping onto the forward's outputs), so both the full loss and a micro-batch's share of it
    are computed in `forward`.
    """

    name = CONTRASTIVE

    @classmethod
    def check(cls, config: Config, world_size: int) -> None:
        """`pretrain.modalities` other than image–text belongs to `limoe pretrain`, then `data.train`
        and the batch split."""
        if config.pretrain.modalities != cls.pairs(config):
            raise LimoeError(f"pretrain.modalities {list(config.pretrain.modalities)} is for limoe pretrain; limoe "
                             f"train without tasks: trains on image–text pairs. Co-train other modalities with "
                             f"tasks[].modalities, or drop pretrain.modalities.")
        super().check(config, world_size)

    def __init__(self, model: Limoe, config: Config):
        super().__init__()
        self.model = model
        self.contrastive = ContrastiveLoss(config.loss.contrastive, config.loss.local_loss)
        self.loss_config = config.loss
        # by modality whose patches FLIP may drop
        self.patch_dropping = {name: PatchDropping.from_config(config, name) for name in PATCH_MODALITIES}

    def stage(self, step: int) -> Optional[str]:
        """FLIP's phase of `step` (None without FLIP): routing statistics are kept apart per phase.
        The modalities share the unmasked phase, so any one that drops patches tells it."""
        stages = {dropping.stage(step) for dropping in self.patch_dropping.values()} - {None}
        return stages.pop() if stages else None

    def patch_keep(self, inputs: Tensor, step: int, modality: str = "image") -> Optional[Tensor]:
        """The patches each input of `modality` (image [B, 3, H, W], audio [B, T], video [B, T, 3, S, S])
        keeps at `step` [B, K]; None (all of them) outside FLIP's masked phase, in evaluation, and for text."""
        dropping = self.patch_dropping.get(modality)
        return dropping.keep(inputs, step) if self.training and dropping is not None else None

    def features(self, batches: Mapping[str, Tensor], keep: Optional[Tensor] = None,
                 kept: str = "image") -> tuple[dict[str, Tensor], list[LayerRouting]]:
        """Raw batches by modality name through the tower together → features [B, D] by name, and
        the routing; `keep` [B, K]: the patches the inputs of modality `kept` keep (None: all)."""
        return self.model.encode(normalized(batches), {kept: {"keep": keep}})

    def loss_parameters(self) -> list[nn.Parameter]:
        """Parameters only the contrastive loss uses (not the tower): the logit scale and SigLIP's bias."""
        bias = self.model.logit_bias
        return [self.model.logit_scale] + ([bias] if bias is not None else [])

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return self.contrastive(image_features, text_features, self.model.logit_scale.exp(), self.model.logit_bias)

    def logged_parameters(self) -> dict[str, Tensor]:
        """The temperature (as open_clip logs it) and SigLIP's bias."""
        logged = {"logit_scale": self.model.logit_scale.exp()}
        if self.model.logit_bias is not None:
            logged["logit_bias"] = self.model.logit_bias
        return logged

    def forward(self, inputs: Tensor, tokens: Tensor, step: int = 0, share: Optional[MicroBatchShare] = None,
                modalities: tuple[str, str] = DEFAULT_MODALITIES) -> ObjectiveOutput:
        """The full loss of this batch of `modalities` pairs at `step`; or, given `share`, a micro-batch's
        surrogate whose gradient is its share of the whole batch's (the feature gradients
        back-propagated, plus its auxiliary share)."""
        first, second = modalities
        keep = self.patch_keep(inputs, step, first) if share is None else share.keep
        features, routing = self.features({first: inputs, second: tokens}, keep, first)
        if share is None:
            contrastive = self.contrastive_loss(features[first], features[second])
            aux, parts = auxiliary_loss(routing, self.loss_config, contrastive.device)
            loss = contrastive + aux
            terms = {"loss": loss, "contrastive": contrastive, "auxiliary": aux, **parts, **self.logged_parameters()}
            return ObjectiveOutput(loss, detached(terms), routing)
        aux, _ = auxiliary_loss(routing, self.loss_config, inputs.device, share.whole_batch)
        first_grad, second_grad = share.feature_grads
        surrogate = ((features[first] * first_grad).sum() + (features[second] * second_grad).sum()
                     + aux + sum((p * g).sum() for p, g in zip(self.loss_parameters(), share.loss_parameter_grads)))
        return ObjectiveOutput(surrogate, {}, routing)

    def clamp_temperatures(self) -> None:
        """After each update: the learned temperatures stay within CLIP's bound."""
        clamp_logit_scale(self.model.logit_scale)


def normalized(batches: Mapping[str, Optional[Tensor]]) -> dict[str, Tensor]:
    """The given batches (None left out), uint8 pixels normalised here, on the device: images
    [B, 3, H, W] and video clips [B, T, 3, S, S], each frame as an image. Only pixels come as uint8
    (text is int64 ids, audio float waveforms)."""
    return {name: normalize(batch) if batch.dtype == torch.uint8 else batch
            for name, batch in batches.items() if batch is not None}


def _summed_auxiliary(calls: list[list[LayerRouting]], config: LossConfig, device) -> tuple[Tensor, dict[str, Tensor]]:
    """The auxiliary losses of several forward passes (a classification step's images and prompts)."""
    total, parts = torch.zeros((), device=device), {}
    for routing in calls:
        aux, call_parts = auxiliary_loss(routing, config, device)
        total = total + aux
        for name, value in call_parts.items():
            parts[name] = parts.get(name, 0.0) + value
    return total, parts


class CoTrainingObjective(ContrastiveObjective):
    """`limoe train` with `tasks:`: the contrastive objective plus the classification task type (its
    loss and its temperature), stepped by the task schedule (`limoe.training.cotraining`).

    `forward(inputs, targets, step, share, prompts, templates, modalities)` → (loss, detached terms,
    routing). For pairs (`prompts` None) `targets` are caption tokens and everything is the
    contrastive objective's, micro-batch shares and FLIP's patch dropping included. For
    classification the inputs are of `modalities[0]` (images, audio or video clips) and `targets` index the
    candidate classes, whose prompts [K·T, L] are encoded here; images and clips drop patches as the
    pairs' do at `step`; the routing is then one list per forward pass (the inputs', the prompts').
    """

    name = COTRAINING

    def __init__(self, model: Limoe, config: Config):
        super().__init__(model, config)
        self.classification = CandidateLoss()
        self.config = config

    @classmethod
    def check(cls, config: Config, world_size: int) -> None:
        """Every task's input and batch split (instead of `data.train`'s), then train.batch_size's split."""
        check_tasks(config, world_size)
        micro_batch_size(config, world_size)

    @classmethod
    def local_batches(cls, config: Config, world_size: int) -> list[LocalBatch]:
        """One batch per task (each task's loader reads all the while), of the modality it feeds
        besides text (a task's `modalities` are one of image or audio, and text)."""
        return [LocalBatch(f"task '{task.name}' ({'tasks[].batch_size' if task.batch_size else 'train.batch_size'})",
                           config.task_batch_size(task) // world_size,
                           next(name for name in task.modalities if name != "text"))
                for task in config.tasks]

    def lr_scale(self, step: int) -> float:
        """The lr_scale of the task the schedule runs at `step` (PolyViT's `lr_coefs`; 1 for accumulate)."""
        return self._task_lr_scales(step)

    @functools.cached_property
    def _task_lr_scales(self) -> Callable[[int], float]:
        """step → lr_scale, from the schedule; built on first use, as the loss alone needs no tasks."""
        return lr_scale(self.config)

    def steps(self, engine, config: Config, session: Session, start: int, clock: WaitClock) -> StepSource:
        return StepSource(*task_steps(engine, config, session, start, clock))

    def forward(self, inputs: Tensor, targets: Tensor, step: int = 0, share: Optional[MicroBatchShare] = None,
                prompts: Optional[Tensor] = None, templates: int = 1,
                modalities: tuple[str, str] = DEFAULT_MODALITIES) -> ObjectiveOutput:
        if prompts is None:
            return super().forward(inputs, targets, step, share, modalities)
        first = modalities[0]
        features, routing = self.features({first: inputs}, self.patch_keep(inputs, step, first), first)  # [B, D]
        prompt_features, prompt_routing = encode_prompts(self.model, prompts)  # [K·T, D]
        classes = class_embeddings(prompt_features, templates)  # [K, D]
        classification, accuracy = self.classification(features[first], classes, targets)
        calls = [routing, prompt_routing]
        aux, parts = _summed_auxiliary(calls, self.loss_config, classification.device)
        loss = classification + aux
        terms = {"loss": loss, "classification": classification, "accuracy": accuracy, "auxiliary": aux, **parts,
                 "logit_scale": self.classification.logit_scale.exp(), "candidates": loss.new_tensor(len(classes))}
        return ObjectiveOutput(loss, {k: v.detach().float().reshape(()) for k, v in terms.items()}, calls)

    def clamp_temperatures(self) -> None:
        super().clamp_temperatures()
        clamp_logit_scale(self.classification.logit_scale)


def objective_for(config: Config) -> type[ContrastiveObjective]:
    """`limoe train`'s objective: co-training with `tasks:`, contrastive training without."""
    return CoTrainingObjective if config.tasks else ContrastiveObjective
