"""k-nearest-neighbour classification with a model's image (audio, video) tokens: how well a
representation separates classes with no head trained on top (the k-NN probe of MAE and DINO).

The features are the mean of the tower's final patch tokens (of the image, or of the audio
or video stream for clips), L2-normalised: what masked
pretraining trains (its pooling head and projection into the joint space are left untouched
until contrastive training). Leave-one-out over one labelled set: each image takes the class
its k most similar other images vote for, each vote weighted by exp(cosine similarity / 0.07).
So k runs from 1 to N − 1 for N labelled images; `limoe eval knn` counts the labels in the
shards and checks k before it loads or encodes anything, and again with the images that decoded.
"""

from __future__ import annotations

from pathlib import Path
import tarfile
import zlib
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor

from limoe.checkpoints import load_model
from limoe.data.pipeline import REMOTE, EvalBatch, eval_loader, expand_shards
from limoe.distributed import resolve_device
from limoe.errors import LimoeError
from limoe.evaluate.inputs import check_modality, check_placement, check_still_frame, counted_as, eval_inputs
from limoe.data.pipeline import loader_options
from limoe.evaluate.runtime import check_report_output, inference, nothing_read, report
from limoe.model.tower import Limoe


def token_features(model: Limoe, batches: Iterable[EvalBatch], modality: str = "image",
                   still_frame: bool = False) -> tuple[Tensor, Tensor]:
    """Mean final token of `modality`'s stream per image (or clip) [N, d], L2-normalised, and the
    labels [N]; `still_frame`: video clips as their centre frame repeated."""
    features, labels = [], []
    with inference(model) as device:
        for batch in batches:
            streams, _ = model.tower({modality: model.embed(modality, eval_inputs(batch.images, device, still_frame))})
            features.append(F.normalize(streams[modality].x.float().mean(dim=1), dim=-1).cpu())  # [B, d]
            labels.append(batch.labels)
    if not features:
        raise nothing_read(batches, f"k-NN needs classification shards of {counted_as(modality)} with .cls labels")
    return torch.cat(features), torch.cat(labels)


def check_k(k: int, samples: Optional[int], data: object) -> None:
    """Refuse a k outside [1, samples − 1]: leave-one-out has samples − 1 others to vote. With
    `samples` unknown (None) only k ≥ 1 is checked."""
    if k < 1 and samples is None:
        raise LimoeError(f"--k {k} is out of range; give a whole number ≥ 1 (neighbours that vote).")
    if samples is not None and not 1 <= k <= samples - 1:
        others = f"give 1 ≤ k ≤ {samples - 1}" if samples > 1 else "k-NN needs at least 2 labelled images"
        raise LimoeError(f"--k {k} is out of range for the {samples} labelled images of {data}, each of which has "
                         f"{max(samples - 1, 0)} others to vote; {others}.")


def labelled_samples(spec: str) -> Optional[int]:
    """The number of samples with a `.cls` label in local shards, read without decoding an image
    (None for remote shards, which are not read twice); a shard that breaks off counts up to there,
    as the loader does."""
    shards = expand_shards(spec)
    if any(REMOTE.match(shard) for shard in shards):
        return None
    count = 0
    for shard in shards:
        try:
            count += sum("cls" in sample for sample in wds.tarfile_samples([{"url": shard}]))
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error):
            pass
    return count


def knn_predictions(features: Tensor, labels: Tensor, k: int = 5, temperature: float = 0.07) -> Tensor:
    """Leave-one-out k-NN classes [N]: each image's k most similar others vote with weight
    exp(similarity / temperature) (Wu et al. 2018, DINO). features [N, d] L2-normalised, labels [N];
    1 ≤ k ≤ N − 1."""
    check_k(k, len(labels), "this set")
    similarity = features @ features.T  # [N, N]
    similarity.fill_diagonal_(-float("inf"))  # an image is not its own neighbour
    nearest, index = similarity.topk(k, dim=1)  # [N, k]
    votes = torch.zeros(len(labels), int(labels.max()) + 1)  # [N, classes]
    return votes.scatter_add_(1, labels[index], (nearest / temperature).exp()).argmax(dim=1)


def knn_accuracy(features: Tensor, labels: Tensor, k: int = 5) -> float:
    """Leave-one-out top-1 accuracy of `knn_predictions`."""
    return (knn_predictions(features, labels, k) == labels).float().mean().item()


def evaluate_knn(model: Limoe, data: Union[str, Iterable[EvalBatch]], k: int = 5, batch_size: int = 128,
                 workers: int = 2, resize_on: str = "worker", decode_on: str = "worker", modality: str = "image",
                 still_frame: bool = False) -> dict:
    """k-NN top-1 of `model`'s image tokens (`modality`'s: audio or video tokens) on classification
    shards (a spec) or EvalBatches with labels; `resize_on`, `decode_on`: where the shards' images
    are resized and centre-cropped, and decoded (images only); `still_frame`: each video clip read as
    its centre frame repeated."""
    check_k(k, None, data)  # before encoding; the upper bound needs the number of images read
    check_modality(model, modality)
    check_placement(modality, resize_on, decode_on)
    check_still_frame(modality, still_frame)
    config = model.config
    loader = data if not isinstance(data, str) else eval_loader(
        data, batch_size, config.image_size, config.context_length, workers, classification=True,
        max_bad_fraction=1.0, rank=0, world_size=1, resize_on=resize_on, decode_on=decode_on,
        **loader_options(config, modality),
    )
    features, labels = token_features(model, loader, modality, still_frame)
    check_k(k, len(labels), data)
    return {"knn_top1": knn_accuracy(features, labels, k), "k": k, counted_as(modality): len(labels)}


def run_knn(checkpoint: Path, data: str, k: int, output: Optional[str], batch_size: int,
            capacity_factor: Optional[str], device: str, workers: int, random_init: bool = False,
            resize_on: str = "worker", decode_on: str = "worker", modality: str = "image",
            still_frame: bool = False) -> dict:
    """`limoe eval knn`: the checkpoint's k-NN top-1; with `random_init`, beside the same
    architecture freshly initialised from the run's seed (what training added to the features)."""
    check_report_output(output, checkpoint, data)
    check_placement(modality, resize_on, decode_on)
    check_still_frame(modality, still_frame)
    check_k(k, labelled_samples(data), data)  # before loading or encoding anything
    model, config = load_model(checkpoint, resolve_device(device), capacity_factor)
    metrics = evaluate_knn(model, data, k, batch_size, workers, resize_on, decode_on, modality, still_frame)
    if random_init:
        torch.manual_seed(config.train.seed)  # the weights the run started from (without train.init_from)
        fresh = Limoe(config.model).to(next(model.parameters()).device)
        metrics["random_init_knn_top1"] = evaluate_knn(fresh, data, k, batch_size, workers, resize_on, decode_on,
                                                       modality, still_frame)["knn_top1"]
    report(f"k-NN (k={k}) of {checkpoint}'s {modality} tokens on {data}", metrics, output)
    return metrics
