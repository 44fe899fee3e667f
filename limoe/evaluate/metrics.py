"""Evaluation metrics as pure functions of scores and labels: no model, no data, no device.

Kept apart from the loops that produce embeddings so the trainer, the command line and tests
compute the same numbers, and so each metric can be checked against values worked out by hand.

In classification and retrieval ties count against the model: a candidate that scores exactly
as high as the right answer ranks ahead of it. A collapsed model that maps every input to the
same embedding therefore scores chance or worse, never a perfect recall. Choosing among
candidates follows clip_benchmark by default instead (a tie goes to the earlier candidate, its
`argmax`), so that its numbers compare with published ones, and reports how often that decided.
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


def retrieval_metrics(image_features: Tensor, text_features: Tensor, text_to_image: Tensor,
                      modality: str = "image") -> dict[str, float]:
    """Recall@1/5/10 both ways for images [N, D] and texts [M, D] (same space, any scale), keyed
    `image_to_text_R@k` and `text_to_image_R@k`; for audio or video clips (`modality`),
    `audio_to_text_R@k` and `text_to_audio_R@k` (`video_to_text_R@k` …).

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
        metrics[f"{modality}_to_text_R@{k}"] = (image_rank < k).float().mean().item()
        metrics[f"text_to_{modality}_R@{k}"] = (text_rank < k).float().mean().item()
    return metrics


TIE_RULES = ("first", "strict")


def selection_metrics(scores: Sequence[Tensor], matches: Sequence[Sequence[tuple[int, int]]],
                      ties: str = "first") -> dict[str, float]:
    """clip_benchmark's image-caption selection metrics of choice items, with how often ties decided.

    Item n has scores[n] [I, T] (image i against text t) and the (image, text) pairs `matches[n]`
    that belong together. Its text choice is right when, for every matching pair, the pair's text
    is the pick among the texts for the pair's image; its image choice is right when the pair's
    image is the pick among the images for the pair's text. `ties` says how a top score shared by
    several candidates is picked: 'first' takes the earliest of them, as clip_benchmark's
    `argmax` does (so a SugarCrepe caption that tokenizes like its negative counts as right, the
    caption coming first); 'strict' takes none of them (a tie is wrong). A side with a single
    candidate has nothing to choose from and counts as right (as in clip_benchmark, where
    SugarCrepe's image_acc is therefore 1).

    Returns the fractions of items whose text choice (`text_acc`), image choice (`image_acc`) and
    both (`acc`) are right, and the fractions of items where the right candidate shared the top
    score with another on the text side (`text_ties`), the image side (`image_ties`) or either
    (`ties`): the items the rule decided.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, not {ties!r}")
    text_right, image_right, text_tied, image_tied = [], [], [], []
    for item_scores, pairs in zip(scores, matches):
        text = [_pick(item_scores[i], t, ties) for i, t in pairs]
        image = [_pick(item_scores[:, t], i, ties) for i, t in pairs]
        text_right.append(all(right for right, _ in text))
        image_right.append(all(right for right, _ in image))
        text_tied.append(any(tied for _, tied in text))
        image_tied.append(any(tied for _, tied in image))
    text, image = torch.tensor(text_right), torch.tensor(image_right)
    text_ties, image_ties = torch.tensor(text_tied), torch.tensor(image_tied)
    return {"acc": (text & image).float().mean().item(), "text_acc": text.float().mean().item(),
            "image_acc": image.float().mean().item(), "ties": (text_ties | image_ties).float().mean().item(),
            "text_ties": text_ties.float().mean().item(), "image_ties": image_ties.float().mean().item()}


def _pick(candidates: Tensor, right: int, ties: str) -> tuple[bool, bool]:
    """Whether candidate `right` of candidates [K] is picked under the tie rule, and whether it
    shares the top score with another candidate."""
    at_top = candidates == candidates.max()  # [K]
    tied = bool(at_top[right]) and int(at_top.sum()) > 1
    if ties == "strict":
        return bool(at_top[right]) and not tied, tied
    return int(candidates.argmax()) == right, tied  # torch's argmax: the first of equal maxima


def _wrong_above(scores: Tensor, correct: Tensor) -> Tensor:
    """For each row of scores [Q, C]: how many wrong candidates score at least as high as the best
    correct one (0 means a hit at rank 1). `correct` [Q, C] marks the right candidates."""
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # [Q, 1]
    return ((scores >= best) & ~correct).sum(dim=1)
