"""Evaluation metrics as pure functions of scores and labels: no model, no data, no device.

Kept apart from the loops that produce embeddings so the trainer, the command line and tests
compute the same numbers, and so each metric can be checked against values worked out by hand.

Ties count against the model: a candidate that scores exactly as high as the right answer
ranks ahead of it. A collapsed model that maps every input to the same embedding therefore
scores chance or worse, never a perfect recall.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

RECALL_AT = (1, 5, 10)


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy and mean per-class recall of logits [N, C] for labels [N].

    Mean per-class recall (balanced accuracy) averages the top-1 recall of the classes that
    occur in `labels`, so a class without samples neither helps nor hurts. With fewer than five
    classes top-5 is top-C.
    """
    wrong = _wrong_above(logits, torch.nn.functional.one_hot(labels, logits.shape[1]).bool())  # [N]
    top1 = wrong == 0
    samples = torch.bincount(labels, minlength=logits.shape[1])  # [C]
    hits = torch.bincount(labels, weights=top1.float(), minlength=logits.shape[1])  # [C]
    present = samples > 0
    return {
        "top1": top1.float().mean().item(),
        "top5": (wrong < 5).float().mean().item(),
        "mean_per_class_recall": (hits[present] / samples[present]).mean().item(),
    }


def retrieval_metrics(image_features: Tensor, text_features: Tensor, text_to_image: Tensor) -> dict[str, float]:
    """Recall@1/5/10 both ways for images [N, D] and texts [M, D] (same space, any scale).

    `text_to_image` [M] holds the index of each text's image, so an image may have several
    texts. Text→image: is a text's image among its k most similar images. Image→text: is any of
    an image's texts among its k most similar texts; images without a text are not queried.
    """
    scores = text_features.float() @ image_features.float().T  # [M, N]
    matches = text_to_image[:, None] == torch.arange(len(image_features), device=scores.device)  # [M, N]
    image_queries = matches.any(dim=0)  # [N] images that have a text
    text_rank = _wrong_above(scores, matches)  # [M]
    image_rank = _wrong_above(scores.T[image_queries], matches.T[image_queries])  # [N']
    metrics = {}
    for k in RECALL_AT:
        metrics[f"image_to_text_R@{k}"] = (image_rank < k).float().mean().item()
        metrics[f"text_to_image_R@{k}"] = (text_rank < k).float().mean().item()
    return metrics


def selection_metrics(scores: Sequence[Tensor], matches: Sequence[Sequence[tuple[int, int]]]) -> dict[str, float]:
    """clip_benchmark's image-caption selection metrics of choice items.

    Item n has scores[n] [I, T] (image i against text t) and the (image, text) pairs `matches[n]`
    that belong together. Its text choice is right when, for every matching pair, the pair's text
    scores strictly above every other text for the pair's image; its image choice is right when
    the pair's image scores strictly above every other image for the pair's text. A side with a
    single candidate has nothing to choose from and counts as right (as in clip_benchmark, where
    SugarCrepe's image_acc is therefore 1). Returns the fractions of items whose text choice
    (`text_acc`), image choice (`image_acc`) and both (`acc`) are right.
    """
    text_right, image_right = [], []
    for item_scores, pairs in zip(scores, matches):
        text_right.append(all(_alone_at_top(item_scores[i], t) for i, t in pairs))
        image_right.append(all(_alone_at_top(item_scores[:, t], i) for i, t in pairs))
    text, image = torch.tensor(text_right), torch.tensor(image_right)
    return {"acc": (text & image).float().mean().item(), "text_acc": text.float().mean().item(),
            "image_acc": image.float().mean().item()}


def _alone_at_top(candidates: Tensor, right: int) -> bool:
    """Whether candidate `right` of candidates [K] scores strictly above all the others."""
    return int((candidates >= candidates[right]).sum()) == 1


def _wrong_above(scores: Tensor, correct: Tensor) -> Tensor:
    """For each row of scores [Q, C]: how many wrong candidates score at least as high as the best
    correct one (0 means a hit at rank 1). `correct` [Q, C] marks the right candidates."""
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # [Q, 1]
    return ((scores >= best) & ~correct).sum(dim=1)
