"""Uni-Perceiver's prompt tuning of a classifier over a label set, with the tower frozen.

Trained: every LayerNorm (the blocks', the final one and the pooling heads'), the deep prompt
tokens and their gates (limoe.model.prompts), and the zero-initialised linear term added to the
scaled cosine logits. Frozen, bit for bit: embeddings, attention and MLP weights, experts,
routers, pooling attention, projections and the logit scale. The logits are those of zero-shot
classification, exp(logit_scale)·cos(input, class) + linear(input), where each class embedding
is its prompts' normalised embeddings averaged over the templates and renormalised, computed
with gradient at every step from the whole label set (Uni-Perceiver encodes its targets with
gradient too). The inputs are images, or the audio clips of a model with audio (the deep prompts
sit in the shared blocks, so they serve either). Loss: cross-entropy with label smoothing.

The tower runs with inference routing (no router noise, the eval capacity factor), because the
routers are frozen and the function being tuned should be the one evaluated; the auxiliary
routing losses, which exist to train routers, are not used.

Recipe (`TuneRecipe`): Uni-Perceiver's released ImageNet prompt-tuning config (Adam with betas
(0.9, 0.95), eps 1e-6, no weight decay, gradient-norm clip 0.1, label smoothing 0.1, 10 deep
prompt tokens per layer, batch 64, linear warmup over the first 20% of steps then cosine decay
to 1% of the peak) for everything but the peak learning rate and the number of steps, which
depend on the amount of data: see docs/EVALUATION.md for the values measured on the demo.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from limoe.data.preprocess import tokenizer
from limoe.errors import LimoeError
from limoe.evaluate.inputs import encode_inputs
from limoe.prompt_templates import Template, class_template
from limoe.model.prompts import DeepPrompts, LabelHead, classification_logits
from limoe.model.tower import Limoe


@dataclass(frozen=True)
class TuneRecipe:
    steps: int
    lr: float = 1e-3
    batch_size: int = 64
    prompt_tokens: int = 10
    seed: int = 0
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.2
    min_lr_fraction: float = 0.01
    grad_clip: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.prompt_tokens < 1 or not self.lr > 0:
            raise LimoeError("--steps must be at least 0, and --batch-size, --prompt-tokens and --lr positive.")

    def lr_factor(self, step: int) -> float:
        """The learning rate of `step` (0-based) as a fraction of the peak."""
        warmup = math.ceil(self.warmup_fraction * self.steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.min_lr_fraction + (1 - self.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def tuned_parameters(model: Limoe) -> dict[str, nn.Parameter]:
    """The parameters prompt tuning trains, by name: LayerNorms, deep prompts, the label head."""
    tuned = (nn.LayerNorm, DeepPrompts, LabelHead)
    return {f"{module_name}.{name}" if module_name else name: parameter
            for module_name, module in model.named_modules() if isinstance(module, tuned)
            for name, parameter in module.named_parameters()}


def template_strings(templates: Sequence[Template]) -> list[str]:
    """Templates as `str.format` strings with one {} (open_clip's callables applied to "{}"), so
    they can be recorded in the tuned file."""
    return [class_template(template if isinstance(template, str) else template("{}"), "the prompt templates")
            for template in templates]


def class_embeddings(model: Limoe, tokens: Tensor, num_classes: int) -> Tensor:
    """Class embeddings [D, C] from prompt tokens [C·T, L] (class-major), with gradient: open_clip's
    `build_zero_shot_classifier` arithmetic (mean of normalised embeddings, renormalised)."""
    embeddings = model.encode_text(tokens).float()  # [C·T, D]
    return F.normalize(embeddings.view(num_classes, -1, embeddings.shape[-1]).mean(dim=1), dim=-1).T


def tune_prompts(model: Limoe, inputs: Tensor, labels: Tensor, classnames: Sequence[str], templates: Sequence[str],
                 recipe: TuneRecipe, progress: bool = False, modality: str = "image") -> list[float]:
    """Train the tuned parameters of a model that has prompt-tuning parts on support inputs of
    `modality` (images [S, 3, H, W] or clips [S, T]) with labels [S]; every other parameter is
    left untouched. Returns the losses."""
    device = model.logit_scale.device
    tuned = tuned_parameters(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in tuned.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(tuned.values(), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)
    prompts = tokenizer(model.config.context_length)([t.format(c) for c in classnames for t in templates]).to(device)
    batches = _support_batches(len(labels), recipe.batch_size, torch.Generator().manual_seed(recipe.seed))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    model.eval()  # inference routing: no router noise, eval capacity
    losses = []
    for _ in tqdm(range(recipe.steps), desc="tune", unit="step", disable=not progress):
        rows = next(batches)
        with torch.enable_grad(), autocast:
            features = encode_inputs(model, modality, inputs[rows].to(device))  # [b, D]
            logits = classification_logits(model, features, class_embeddings(model, prompts, len(classnames)))
            loss = F.cross_entropy(logits, labels[rows].to(device), label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.values(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return losses


def _support_batches(count: int, batch_size: int, generator: torch.Generator):
    """Row indices of support minibatches: seeded epochs of a fresh permutation, the whole set
    per step when it fits in one batch."""
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - min(batch_size, count) + 1, batch_size):
            yield order[start:start + batch_size]
