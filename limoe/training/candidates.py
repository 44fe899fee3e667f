"""Classification as similarity to candidate targets (Uni-Perceiver): no head, the model stays zero-shot.

A labelled image is scored against its task's class names, each written into every prompt
template and encoded by the same tower — with gradient, every step — exactly as zero-shot
evaluation builds its classifier: a class's embedding is the mean of its prompts' embeddings,
L2-normalised. The logits are cosine similarities times a learned temperature of the
classification task type (initialised at 1/0.07, kept ≤ 100), trained with cross-entropy over the
candidates. Because the classes are text, nothing in the model is tied to one label set.

With several data-parallel ranks the prompts are split between them: each rank encodes an equal
slice (the last rows repeated to make the slices equal, as the expert all-to-all needs the same
shapes everywhere) and the slices are gathered with gradient, so every rank scores its images
against every candidate while encoding only its share.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather

from limoe.config import TaskConfig
from limoe.data.pipeline import read_classnames
from limoe.data.preprocess import tokenizer
from limoe.distributed import rank_and_world
from limoe.prompt_templates import Template, class_prompts, load_classnames
from limoe.model.routing import LayerRouting
from limoe.model.tower import Limoe
from limoe.training.batches import prompts_per_process

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # Uni-Perceiver's (and CLIP's) initial temperature, as a log


def task_classnames(task: TaskConfig) -> list[str]:
    """A classification task's class names: its `classnames` file, else the classnames.txt beside its shards."""
    return load_classnames(Path(task.classnames)) if task.classnames else read_classnames(task.data)


def prompt_tokens(classnames: Sequence[str], templates: Sequence[Template], context_length: int) -> Tensor:
    """Token ids [C·T, L] of every class's prompts, class-major (class c's are rows c·T … c·T + T − 1)."""
    return tokenizer(context_length)(class_prompts(classnames, templates))


def class_embeddings(prompt_features: Tensor, templates: int) -> Tensor:
    """[K·T, D] L2-normalised prompt embeddings, class-major → [K, D] class embeddings: each class's
    mean over its templates, renormalised (the zero-shot classifier's protocol)."""
    per_class = prompt_features.view(-1, templates, prompt_features.shape[-1]).mean(dim=1)  # [K, D]
    return F.normalize(per_class, dim=-1)


def encode_prompts(model: Limoe, tokens: Tensor) -> tuple[Tensor, list[LayerRouting]]:
    """Prompt embeddings [P, D] of tokens [P, L] with gradient, and the routing of this rank's share.

    One process encodes them all; with W data-parallel ranks each encodes ⌈P / W⌉ rows and the
    embeddings are gathered with gradient (each rank's loss then reaches every rank's slice, and
    DeepSpeed's gradient averaging makes that the gradient of the global mean loss).
    """
    rank, world = rank_and_world()
    if world == 1:
        output = model(None, tokens)
        return output.text_features, output.routing
    count = tokens.shape[0]
    share = prompts_per_process(count, world)
    padded = torch.cat([tokens, tokens[-1:].expand(share * world - count, -1)])  # [W·share, L]
    output = model(None, padded[rank * share : (rank + 1) * share])
    gathered = torch.cat(all_gather(output.text_features))  # [W·share, D], with gradient
    return gathered[:count], output.routing


class CandidateLoss(nn.Module):
    """Cross-entropy of images over candidate classes; owns the classification temperature.

    One instance serves every classification task: the temperature belongs to the task type
    (Uni-Perceiver), as the model's own `logit_scale` belongs to image-text pairs.
    """

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor([LOGIT_SCALE_INIT]))  # [1], log of the temperature

    def logits(self, image_features: Tensor, classes: Tensor) -> Tensor:
        """image_features [B, D], classes [K, D], both L2-normalised → [B, K] scaled cosines."""
        return self.logit_scale.exp() * image_features @ classes.T

    def forward(self, image_features: Tensor, classes: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy, top-1 accuracy among the candidates) for targets [B] indexing classes."""
        logits = self.logits(image_features, classes)  # [B, K]
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return F.cross_entropy(logits, targets), accuracy.detach()


def candidate_subset(labels: Tensor, num_classes: int, size: int, generator: torch.Generator) -> Tensor:
    """The classes [K] to score a batch against: every class among `labels`, then others drawn at
    random (from `generator`, so every rank draws the same) up to `size` — or just the labels' own
    classes when the batch holds more than `size` of them."""
    present = torch.unique(labels.cpu())  # [k] sorted
    absent = torch.ones(num_classes, dtype=torch.bool)
    absent[present] = False
    others = absent.nonzero().squeeze(1)  # [C - k]
    fill = others[torch.randperm(len(others), generator=generator)[: max(size - len(present), 0)]]
    return torch.cat([present, fill])


def most_candidates(size: Union[str, int], num_classes: int, global_batch: int) -> int:
    """The most classes one step scores: all of them, or `size` — more when the batch holds more
    distinct labels than that (`candidate_subset` keeps every label's class)."""
    if size == "all":
        return num_classes
    return min(num_classes, max(size, global_batch))


def prompt_rows(classes: Tensor, templates: int) -> Tensor:
    """Rows [K·T] of the class-major prompt tokens that hold `classes`' prompts, in their order."""
    return (classes[:, None] * templates + torch.arange(templates, device=classes.device)).flatten()


def positions(classes: Tensor, labels: Tensor) -> Tensor:
    """Index of each label [B] in `classes` [K] (every label must be among them)."""
    return (labels[:, None] == classes[None, :]).int().argmax(dim=1)
