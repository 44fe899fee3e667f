"""The masked-pretraining objective: what one step of `limoe pretrain` computes, by step.

OmniVec2's first two stages on the shared tower, as a schedule that is a pure function of the
step (so a resumed run continues exactly, and every rank runs the same task, as expert
parallelism's all-to-all needs):

  unimodal  (the first `pretrain.unimodal_steps`): masked patch modelling (images, audio
            clips' spectrograms, or video clips' tubelets) and masked language modelling on captions, alternating step by
            step (PolyViT's round-robin);
  bimodal   (the next `pretrain.bimodal_steps`): the same two tasks, each given the other
            modality: the tower encodes the pair together (joint routing, as in contrastive
            training) and the predicted modality's tokens attend to the other's through the
            training-only fusion blocks.

`pretrain.modalities` says what the pairs hold: image–text (the default), audio–text or
video–text. Masked patch modelling is MAE's (AudioMAE's for audio clips, VideoMAE's for video
clips, whose masks are tubes: the same grid positions hidden at every tubelet step): only the
visible patches enter the tower, a light decoder predicts the hidden ones' normalised values,
which the modality's embedder gives in its token order (`patch_values`: pixels, normalised
log-mel, or a tubelet's pixels frame by frame). Masked language modelling is
BERT's: 80/10/10 replacement with a learned mask embedding, scored against the token embedding.
All tokens pass the same MoE blocks and routers as in contrastive training, and the auxiliary
routing losses are added to every step's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from limoe.config import Config, PretrainConfig
from limoe.data.preprocess import normalize, tokenizer
from limoe.distributed import rank_and_world
from limoe.errors import LimoeError
from limoe.model.masking import IGNORE, BatchShard, corrupt_tokens, masked_patches, step_generator, tube_keep_at
from limoe.model.routing import LayerRouting
from limoe.modalities.text import PAD_TOKEN
from limoe.model.tower import Limoe
from limoe.pretraining.heads import CrossAttentionFusion, MlmHead, PixelDecoder
from limoe.pretraining.losses import masked_patch_loss, masked_token_loss, normalized_patches
from limoe.training.losses import auxiliary_loss, clamp_logit_scale
from limoe.training.objectives import ObjectiveOutput, PairsObjective

PRETRAINING = "pretraining"


@dataclass(frozen=True)
class MaskedModellingTask:
    """One kind of pretraining step: which modality is masked and predicted, and whether the other
    modality is given (encoded alongside and fused in)."""

    name: str
    predicts: str  # the patch modality (image, audio, video) or text
    given_other: bool


def stage_tasks(modalities: tuple[str, ...]) -> dict[str, tuple[MaskedModellingTask, ...]]:
    """Each stage's tasks on pairs of `modalities` (`pretrain.modalities`: the patch modality, text),
    named after them: masked_image, masked_text, masked_image_given_text, masked_text_given_image."""
    patches, text = modalities
    return {
        "unimodal": (MaskedModellingTask(f"masked_{patches}", patches, False),
                     MaskedModellingTask(f"masked_{text}", text, False)),
        "bimodal": (MaskedModellingTask(f"masked_{patches}_given_{text}", patches, True),
                    MaskedModellingTask(f"masked_{text}_given_{patches}", text, True)),
    }


def stage_at(step: int, config: PretrainConfig) -> str:
    """The stage of 0-based `step`: unimodal for the first `unimodal_steps`, then bimodal."""
    return "unimodal" if step < config.unimodal_steps else "bimodal"


def task_at(step: int, config: PretrainConfig) -> MaskedModellingTask:
    """The task of 0-based `step`: the stage's tasks in turn."""
    tasks = stage_tasks(config.modalities)[stage_at(step, config)]
    return tasks[step % len(tasks)]


def _per_rank_share(targets: Tensor) -> Tensor:
    """The number of predicted tokens over all ranks, divided by the number of ranks (see
    `masked_token_loss`); one scalar all-reduce. Masked patches need none: every image hides as many."""
    count = torch.tensor(float(targets.numel()), device=targets.device)
    world = rank_and_world()[1]
    if world > 1:
        dist.all_reduce(count)
    return count / world


@dataclass
class PatchPrediction:
    prediction: Tensor  # [B, N, P] the decoder's output at every patch (P: p·p·3 pixels, p·p log-mel values, t·p·p·3)
    target: Tensor  # [B, N, P] the patches' normalised values
    hidden: Tensor  # [B, N] bool, the patches the encoder did not see (the ones scored)


@dataclass
class TokenPrediction:
    logits: Tensor  # [T, V] at the T masked tokens of the batch
    targets: Tensor  # [T] their original ids


def check_pretraining_config(config: Config) -> None:
    """The model must embed the pairs' modalities, the stages must fill the run, and FLIP's
    contrastive masking has no place here."""
    config.check_embedded(config.pretrain.modalities, "pretrain.modalities", "pretrain.modalities")
    stages = config.pretrain.unimodal_steps + config.pretrain.bimodal_steps
    if stages != config.train.steps:
        raise LimoeError(
            f"the pretraining stages take {stages} steps (pretrain.unimodal_steps {config.pretrain.unimodal_steps} + "
            f"pretrain.bimodal_steps {config.pretrain.bimodal_steps}) but train.steps is {config.train.steps}; "
            f"make them agree."
        )
    if config.train.micro_batch_size is not None:
        raise LimoeError("train.micro_batch_size splits contrastive training's batch by feature caching; pretraining "
                         "steps on the whole per-GPU batch. Remove train.micro_batch_size or lower train.batch_size.")
    if config.train.image_mask_ratio:
        raise LimoeError("train.image_mask_ratio is contrastive training's patch dropping (FLIP); pretraining masks "
                         "images with pretrain.image_mask_ratio. Remove train.image_mask_ratio.")
    if config.train.audio_mask_ratio:
        raise LimoeError("train.audio_mask_ratio is contrastive training's patch dropping (FLIP) for audio clips; "
                         "pretraining masks clips with pretrain.audio_mask_ratio. Remove train.audio_mask_ratio.")
    if config.train.video_mask_ratio:
        raise LimoeError("train.video_mask_ratio is contrastive training's tube dropping (FLIP) for video clips; "
                         "limoe pretrain does not use it. Remove train.video_mask_ratio.")


class MaskedPretraining(PairsObjective):
    """The objective of `limoe pretrain` (`limoe.training.objectives`): the model plus its
    training-only heads, which only its checkpoints hold (exports and warm starts take the model
    alone), trained on `data.train`'s pairs of `pretrain.modalities`.

    The heads are named by modality, as checkpoints hold them: `image_decoder` (or
    `audio_decoder`, `video_decoder`), and `<modality>_fusion`, through which that modality's tokens attend to the
    other's."""

    name = PRETRAINING

    @classmethod
    def check(cls, config: Config, world_size: int) -> None:
        """No co-training tasks, stages that fill the run, then `data.train` and the batch split."""
        if config.tasks:
            raise LimoeError(f"tasks: co-train the contrastive objective of limoe train, not the {cls.name} "
                             f"objective; remove tasks: from this config.")
        check_pretraining_config(config)
        super().check(config, world_size)

    def __init__(self, model: Limoe, config: Config):
        super().__init__()
        self.model = model
        self.pretrain_config = config.pretrain
        self.loss_config = config.loss
        self.seed = config.train.seed
        m, p = model.config, config.pretrain
        self.modalities = p.modalities  # (the patch modality, text)
        patches = model.embedders[self.modalities[0]]
        self.add_module(f"{patches.name}_decoder", PixelDecoder(m.width, p.decoder_width, p.decoder_depth,
                                                                p.decoder_heads, patches.input_tokens, patches.patch_dim))
        self.mask_embedding = nn.Parameter(torch.randn(m.width) * 0.02)  # BERT's [MASK], as an input vector
        self.mlm_head = MlmHead(m.width, m.vocab_size)
        for name in self.modalities:  # `name`'s tokens attend to the other's
            self.add_module(f"{name}_fusion", CrossAttentionFusion(m.width, m.heads, m.mlp_dim, p.fusion_depth))
        ids = tokenizer(m.context_length)
        self.first_special_id = min(ids.sot_token_id, ids.eot_token_id, m.vocab_size)  # ids at or above: markers

    @classmethod
    def pairs(cls, config: Config) -> tuple[str, ...]:
        return config.pretrain.modalities

    def stage(self, step: int) -> str:
        return stage_at(step, self.pretrain_config)

    def clamp_temperatures(self) -> None:
        """The contrastive temperature gets no gradient here; it is kept within CLIP's bound all the same."""
        clamp_logit_scale(self.model.logit_scale)

    def forward(self, inputs: Tensor, tokens: Tensor, step: int) -> ObjectiveOutput:
        """One step's task on a batch of pairs → (loss, its parts detached, routing). The inputs are
        images (the loader's uint8, or normalised floats), audio clips [B, T] float32 or video clips
        [B, T, 3, S, S] (uint8, or normalised floats)."""
        task = task_at(step, self.pretrain_config)
        inputs = normalize(inputs) if inputs.dtype == torch.uint8 else inputs
        terms = {}
        predicted, routing = self.predict(task, inputs, tokens, step)
        if task.predicts == "text":
            loss, terms[f"{task.name}_accuracy"] = masked_token_loss(predicted.logits, predicted.targets,
                                                                     _per_rank_share(predicted.targets))
        else:
            loss = masked_patch_loss(predicted.prediction, predicted.target, predicted.hidden)
        aux, parts = auxiliary_loss(routing, self.loss_config, loss.device)
        total = self.pretrain_config.loss_weight(task.predicts) * loss + aux
        terms.update({"loss": total, f"{task.name}_loss": loss, "auxiliary": aux, **parts})
        return ObjectiveOutput(total, {k: v.detach().float() for k, v in terms.items()}, routing)

    def predict(self, task: MaskedModellingTask, inputs: Tensor, tokens: Tensor,
                step: int) -> tuple[Union[PatchPrediction, TokenPrediction], list[LayerRouting]]:
        """`task` on a batch of pairs: inputs [B, ...] of the patch modality, captions [B, L]."""
        if task.predicts == "text":
            return self.predict_text(tokens, inputs if task.given_other else None, step)
        return self.predict_patches(inputs, tokens if task.given_other else None, step)

    def predict_patches(self, inputs: Tensor, tokens: Optional[Tensor],
                        step: int) -> tuple[PatchPrediction, list[LayerRouting]]:
        """MAE on images [B, 3, H, W] (AudioMAE on clips [B, T], VideoMAE on clips [B, T, 3, S, S]):
        encode the visible patches (with the caption tokens [B, L] alongside when given, fused in
        after the tower), decode every patch."""
        name = self.modalities[0]
        embedder = self.model.embedders[name]
        keep = self._patch_keep(name, inputs, step)  # [B, K]
        streams = {name: self.model.embed(name, inputs, keep=keep)}
        if tokens is not None:
            streams["text"] = self.model.embed("text", tokens)
        streams, routing = self.model.tower(streams)
        visible = streams[name].x[:, -keep.shape[1]:]  # [B, K, d] (without a class token)
        if tokens is not None:
            visible = self._fusion(name)(visible, streams["text"].x, context_real=streams["text"].key_mask)
        prediction = self.get_submodule(f"{name}_decoder")(visible, keep)  # [B, N, P]
        target = normalized_patches(embedder.patch_values(inputs))  # [B, N, P]
        return PatchPrediction(prediction, target, masked_patches(keep, embedder.input_tokens)), routing

    def _patch_keep(self, name: str, inputs: Tensor, step: int) -> Tensor:
        """The patches [B, K] each input keeps at `step`: a random subset of its patches, or for video
        clips a random subset of the frame grid's, kept at every tubelet step (VideoMAE's tubes)."""
        embedder, ratio = self.model.embedders[name], self.pretrain_config.mask_ratio(name)
        grid = embedder.input_tokens // embedder.steps  # patches of one grid (a video clip's frame grid)
        return tube_keep_at(step, self.seed, f"masked_{name}", inputs, grid, embedder.steps, ratio)

    def _fusion(self, predicted: str) -> CrossAttentionFusion:
        """The fusion through which the tokens of the `predicted` modality attend to the other's."""
        return self.get_submodule(f"{predicted}_fusion")

    def predict_text(self, tokens: Tensor, inputs: Optional[Tensor], step: int) -> tuple[TokenPrediction, list[LayerRouting]]:
        """BERT on captions [B, L] (with the whole inputs of the patch modality alongside when given,
        fused in after the tower): predict the masked tokens. Padding and the start/end markers are
        never masked; padding is never routed."""
        generator = step_generator(self.seed, step, "masked_text", tokens.device)
        maskable = (tokens != PAD_TOKEN) & (tokens < self.first_special_id)  # [B, L]
        corrupted = corrupt_tokens(tokens, maskable, self.pretrain_config.text_mask_ratio, self.pretrain_config.text_replace_with_mask,
                                   self.pretrain_config.text_replace_with_random, (PAD_TOKEN + 1, self.first_special_id),
                                   generator, BatchShard.for_rank(*rank_and_world(), tokens.shape[0]))
        streams = {"text": self.model.embed("text", corrupted.tokens, at_mask=corrupted.at_mask,
                                            mask_embedding=self.mask_embedding)}
        other = self.modalities[0]
        if inputs is not None:
            streams[other] = self.model.embed(other, inputs)
        streams, routing = self.model.tower(streams)
        x = streams["text"].x  # [B, L, d]
        if inputs is not None:
            x = self._fusion("text")(x, streams[other].x, x_real=streams["text"].key_mask)
        predicted = corrupted.targets != IGNORE  # [B, L]
        # Only the T masked tokens are scored against the vocabulary (a selection that costs one
        # host sync; scoring all B·L positions against ~49k ids would cost far more).
        logits = self.mlm_head(x[predicted], self.model.embedders["text"].token_embed.weight)  # [T, V]
        return TokenPrediction(logits, corrupted.targets[predicted]), routing
