"""The masked-pretraining objective: what one step of `limoe pretrain` computes, by step.

OmniVec2's first two stages on the shared tower, as a schedule that is a pure function of the
step (so a resumed run continues exactly, and every rank runs the same task, as expert
parallelism's all-to-all needs):

  unimodal  (the first `pretrain.unimodal_steps`): masked image modelling and masked language
            modelling on captions, alternating step by step (PolyViT's round-robin);
  bimodal   (the next `pretrain.bimodal_steps`): the same two tasks, each given the other
            modality: the tower encodes the pair together (joint routing, as in contrastive
            training) and the predicted modality's tokens attend to the other's through the
            training-only fusion blocks.

Masked image modelling is MAE's: only the visible patches enter the tower, a light decoder
predicts the hidden ones' normalised pixels. Masked language modelling is BERT's: 80/10/10
replacement with a learned mask embedding, scored against the token embedding. Image and text
tokens pass the same MoE blocks and routers as in contrastive training, and the auxiliary
routing losses are added to every step's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from limoe.config import Config, PretrainConfig
from limoe.data.preprocess import normalize, tokenizer
from limoe.distributed import rank_and_world
from limoe.errors import LimoeError
from limoe.model.masking import IGNORE, BatchShard, corrupt_tokens, masked_patches, patch_keep_at, step_generator
from limoe.model.routing import LayerRouting
from limoe.modalities.text import PAD_TOKEN
from limoe.model.tower import Limoe
from limoe.pretraining.heads import CrossAttentionFusion, MlmHead, PixelDecoder
from limoe.pretraining.losses import masked_patch_loss, masked_token_loss, normalized_pixels, patchify
from limoe.training.losses import auxiliary_loss, clamp_logit_scale
from limoe.training.objectives import ObjectiveOutput, PairsObjective

PRETRAINING = "pretraining"


@dataclass(frozen=True)
class MaskedModellingTask:
    """One kind of pretraining step: which modality is masked and predicted, and whether the other
    modality is given (encoded alongside and fused in)."""

    name: str
    predicts: str  # "image" or "text"
    given_other: bool


STAGES: dict[str, tuple[MaskedModellingTask, ...]] = {
    "unimodal": (MaskedModellingTask("masked_image", "image", False),
                 MaskedModellingTask("masked_text", "text", False)),
    "bimodal": (MaskedModellingTask("masked_image_given_text", "image", True),
                MaskedModellingTask("masked_text_given_image", "text", True)),
}


def stage_at(step: int, config: PretrainConfig) -> str:
    """The stage of 0-based `step`: unimodal for the first `unimodal_steps`, then bimodal."""
    return "unimodal" if step < config.unimodal_steps else "bimodal"


def task_at(step: int, config: PretrainConfig) -> MaskedModellingTask:
    """The task of 0-based `step`: the stage's tasks in turn."""
    tasks = STAGES[stage_at(step, config)]
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
    prediction: Tensor  # [B, N, p·p·3] the decoder's output at every patch
    target: Tensor  # [B, N, p·p·3] normalised pixels
    hidden: Tensor  # [B, N] bool, the patches the encoder did not see (the ones scored)


@dataclass
class TokenPrediction:
    logits: Tensor  # [T, V] at the T masked tokens of the batch
    targets: Tensor  # [T] their original ids


def check_pretraining_config(config: Config) -> None:
    """The stages must fill the run, and FLIP's contrastive masking has no place here."""
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
                         "pretraining does not read audio. Remove train.audio_mask_ratio.")


class MaskedPretraining(PairsObjective):
    """The objective of `limoe pretrain` (`limoe.training.objectives`): the model plus its
    training-only heads, which only its checkpoints hold (exports and warm starts take the model
    alone), trained on `data.train`'s pairs."""

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
        self.image_decoder = PixelDecoder(m.width, p.decoder_width, p.decoder_depth, p.decoder_heads, m.num_patches,
                                          3 * m.patch_size**2)
        self.mask_embedding = nn.Parameter(torch.randn(m.width) * 0.02)  # BERT's [MASK], as an input vector
        self.mlm_head = MlmHead(m.width, m.vocab_size)
        self.image_fusion = CrossAttentionFusion(m.width, m.heads, m.mlp_dim, p.fusion_depth)  # image attends to text
        self.text_fusion = CrossAttentionFusion(m.width, m.heads, m.mlp_dim, p.fusion_depth)  # text attends to image
        ids = tokenizer(m.context_length)
        self.first_special_id = min(ids.sot_token_id, ids.eot_token_id, m.vocab_size)  # ids at or above: markers

    def stage(self, step: int) -> str:
        return stage_at(step, self.pretrain_config)

    def clamp_temperatures(self) -> None:
        """The contrastive temperature gets no gradient here; it is kept within CLIP's bound all the same."""
        clamp_logit_scale(self.model.logit_scale)

    def forward(self, images: Tensor, tokens: Tensor, step: int) -> ObjectiveOutput:
        """One step's task on a batch of pairs → (loss, its parts detached, routing). Images come as
        the loader's uint8 or as normalised floats."""
        task = task_at(step, self.pretrain_config)
        images = normalize(images) if images.dtype == torch.uint8 else images
        terms = {}
        if task.predicts == "image":
            predicted, routing = self.predict_image(images, tokens if task.given_other else None, step)
            loss = masked_patch_loss(predicted.prediction, predicted.target, predicted.hidden)
            weight = self.pretrain_config.image_loss_weight
        else:
            predicted, routing = self.predict_text(tokens, images if task.given_other else None, step)
            loss, terms[f"{task.name}_accuracy"] = masked_token_loss(predicted.logits, predicted.targets,
                                                                     _per_rank_share(predicted.targets))
            weight = self.pretrain_config.text_loss_weight
        aux, parts = auxiliary_loss(routing, self.loss_config, loss.device)
        total = weight * loss + aux
        terms.update({"loss": total, f"{task.name}_loss": loss, "auxiliary": aux, **parts})
        return ObjectiveOutput(total, {k: v.detach().float() for k, v in terms.items()}, routing)

    def predict_image(self, images: Tensor, tokens: Optional[Tensor], step: int) -> tuple[PatchPrediction, list[LayerRouting]]:
        """MAE on images [B, 3, H, W]: encode the visible patches (with the caption tokens [B, L]
        alongside when given, fused in after the tower), decode every patch."""
        config = self.model.config
        keep = patch_keep_at(step, self.seed, "masked_image", images, config.num_patches,
                             self.pretrain_config.image_mask_ratio)  # [B, K]
        streams = {"image": self.model.embed("image", images, keep=keep)}
        if tokens is not None:
            streams["text"] = self.model.embed("text", tokens)
        streams, routing = self.model.tower(streams)
        visible = streams["image"].x[:, -keep.shape[1]:]  # [B, K, d] (without a class token)
        if tokens is not None:
            visible = self.image_fusion(visible, streams["text"].x, context_real=streams["text"].key_mask)
        prediction = self.image_decoder(visible, keep)  # [B, N, p·p·3]
        target = normalized_pixels(patchify(images, config.patch_size))
        return PatchPrediction(prediction, target, masked_patches(keep, config.num_patches)), routing

    def predict_text(self, tokens: Tensor, images: Optional[Tensor], step: int) -> tuple[TokenPrediction, list[LayerRouting]]:
        """BERT on captions [B, L] (with the whole images [B, 3, H, W] alongside when given, fused
        in after the tower): predict the masked tokens. Padding and the start/end markers are
        never masked; padding is never routed."""
        generator = step_generator(self.seed, step, "masked_text", tokens.device)
        maskable = (tokens != PAD_TOKEN) & (tokens < self.first_special_id)  # [B, L]
        corrupted = corrupt_tokens(tokens, maskable, self.pretrain_config.text_mask_ratio, self.pretrain_config.text_replace_with_mask,
                                   self.pretrain_config.text_replace_with_random, (PAD_TOKEN + 1, self.first_special_id),
                                   generator, BatchShard.for_rank(*rank_and_world(), tokens.shape[0]))
        streams = {"text": self.model.embed("text", corrupted.tokens, at_mask=corrupted.at_mask,
                                            mask_embedding=self.mask_embedding)}
        if images is not None:
            streams["image"] = self.model.embed("image", images)
        streams, routing = self.model.tower(streams)
        x = streams["text"].x  # [B, L, d]
        if images is not None:
            x = self.text_fusion(x, streams["image"].x, x_real=streams["text"].key_mask)
        predicted = corrupted.targets != IGNORE  # [B, L]
        # Only the T masked tokens are scored against the vocabulary (a selection that costs one
        # host sync; scoring all B·L positions against ~49k ids would cost far more).
        logits = self.mlm_head(x[predicted], self.model.embedders["text"].token_embed.weight)  # [T, V]
        return TokenPrediction(logits, corrupted.targets[predicted]), routing
