"""k-nearest-neighbour classification with a model's image tokens: how well a representation
separates classes with no head trained on top (the k-NN probe of MAE and DINO).

The features are the mean of the tower's final patch tokens, L2-normalised: what masked
pretraining trains (its pooling head and projection into the joint space are left untouched
until contrastive training). Leave-one-out over one labelled set: each image takes the class
with the largest summed cosine similarity among its k nearest other images.
"""

from __future__ import annotations

from typing import Iterable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from limoe.data.pipeline import EvalBatch, eval_loader
from limoe.evaluate.runtime import inference, nothing_read
from limoe.model.tower import Limoe


def image_token_features(model: Limoe, batches: Iterable[EvalBatch]) -> tuple[Tensor, Tensor]:
    """Mean final patch token per image [N, d], L2-normalised, and the labels [N]."""
    features, labels = [], []
    with inference(model) as device:
        for batch in batches:
            (stream,), _ = model.tower([model.embed_image(batch.images.to(device))])
            features.append(F.normalize(stream.x.float().mean(dim=1), dim=-1).cpu())  # [B, d]
            labels.append(batch.labels)
    if not features:
        raise nothing_read(batches, "k-NN needs classification shards with .cls labels")
    return torch.cat(features), torch.cat(labels)


def knn_accuracy(features: Tensor, labels: Tensor, k: int = 5) -> float:
    """Leave-one-out top-1 accuracy of a similarity-weighted k-NN vote. features [N, d] normalised, labels [N]."""
    similarity = features @ features.T  # [N, N]
    similarity.fill_diagonal_(-float("inf"))  # an image is not its own neighbour
    nearest, index = similarity.topk(min(k, len(labels) - 1), dim=1)  # [N, k]
    votes = torch.zeros(len(labels), int(labels.max()) + 1).scatter_add_(1, labels[index], nearest)  # [N, classes]
    return (votes.argmax(dim=1) == labels).float().mean().item()


def evaluate_knn(model: Limoe, data: Union[str, Iterable[EvalBatch]], k: int = 5, batch_size: int = 128,
                 workers: int = 2) -> dict:
    """k-NN top-1 of `model`'s image tokens on classification shards (a spec) or EvalBatches with labels."""
    config = model.config
    loader = data if not isinstance(data, str) else eval_loader(
        data, batch_size, config.image_size, config.context_length, workers, classification=True,
        max_bad_fraction=1.0, rank=0, world_size=1,
    )
    features, labels = image_token_features(model, loader)
    return {"knn_top1": knn_accuracy(features, labels, k), "k": k, "images": len(labels)}
