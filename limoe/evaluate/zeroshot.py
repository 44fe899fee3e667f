"""Zero-shot classification: classify images by their nearest class-name prompt embedding.

Each class's embedding is the mean of its prompt embeddings (one per template), renormalised
(open_clip's `build_zero_shot_classifier`, the CLIP paper's protocol); an image's predicted
classes are those whose embeddings are most cosine-similar to its own.

The data may come in three layouts, recognised in this order:
  - a clip_benchmark webdataset folder (`test/0.tar …`, `test/nshards.txt`, `classnames.txt`),
  - a class-folder tree (ImageNet val by synset, or any ImageFolder tree with a class-names file),
  - webdataset shards with `.cls` labels (a folder of .tar/.tar.gz files, a glob or a brace
    pattern), class names from `classnames.txt` beside them when present, else ImageNet-1k's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from torch import Tensor
from tqdm import tqdm

from limoe.config import ModelConfig
from limoe.data.pipeline import EvalBatch, ShardLoader, eval_loader, expand_shards
from limoe.errors import LimoeError
from limoe.evaluate.folders import ImageFolderLoader, ImageFolderSet, looks_like_image_folder, scan_image_folder
from limoe.evaluate.metrics import classification_metrics
from limoe.data.preprocess import tokenizer
from limoe.evaluate.prompts import Template, load_classnames, load_templates, read_lines
from limoe.files import check_output_file
from limoe.evaluate.runtime import inference, load_for_eval, nothing_read, report
from limoe.model.tower import Limoe

PROMPTS_PER_FORWARD = 800  # prompts encoded in one batch: 10 classes of the 80 OpenAI templates


def zeroshot_classifier(model: Limoe, classnames: Sequence[str], templates: Sequence[Template],
                        progress: bool = False) -> Tensor:
    """Class embeddings [D, C]: each class's prompt embeddings averaged, then L2-normalised."""
    with inference(model) as device:
        classifier = build_zero_shot_classifier(
            model, tokenizer(model.config.context_length), classnames, templates,
            num_classes_per_batch=max(1, PROMPTS_PER_FORWARD // len(templates)), device=device, use_tqdm=progress,
        )
    return classifier.float()


def encode_labelled_images(model: Limoe, batches: Iterable[EvalBatch],
                           progress: bool = False) -> tuple[Tensor, Tensor]:
    """Image features [N, D] and labels [N] of every image in `batches`, on the CPU."""
    features, labels = [], []
    with inference(model) as device:
        for batch in tqdm(batches, desc="images", unit="batch", disable=not progress):
            features.append(model.encode_image(batch.images.to(device, non_blocking=True)).float().cpu())  # [B, D]
            labels.append(batch.labels)
    if not labels:
        raise nothing_read(batches, "zero-shot classification needs labelled images: class folders or shards with .cls")
    return torch.cat(features), torch.cat(labels)


def open_classification_set(data: str, classnames: Optional[Path], config: ModelConfig, batch_size: int,
                            workers: int) -> tuple[Union[ImageFolderLoader, ShardLoader], list[str]]:
    """A loader of labelled EvalBatches for `data` in any supported layout, and its class names."""
    path = Path(data)
    if path.is_dir() and (path / "test" / "nshards.txt").is_file():
        count = int((path / "test" / "nshards.txt").read_text().strip())
        spec, beside = f"{path}/test/{{0..{count - 1}}}.tar", path / "classnames.txt"
    elif path.is_dir() and looks_like_image_folder(path):
        folder = scan_image_folder(path)
        loader = ImageFolderLoader(folder, config.image_size, batch_size, workers)
        return loader, _folder_classnames(folder, classnames)
    else:
        spec = data
        beside = Path(expand_shards(spec)[0]).parent / "classnames.txt"
    if classnames is None and beside.is_file():
        classnames = beside
    loader = eval_loader(spec, batch_size, config.image_size, config.context_length, workers, classification=True,
                         max_bad_fraction=1.0, rank=0, world_size=1)
    return loader, load_classnames(classnames)


def _folder_classnames(folder: ImageFolderSet, path: Optional[Path]) -> list[str]:
    """The class-names file's names, one per class folder; ImageNet-1k's for its synset folders."""
    if path is None:
        if not folder.is_imagenet:
            raise LimoeError(
                f"{folder.root} has {len(folder.classes)} class folders that are not the 1000 ImageNet-1k "
                f"synsets; give --classnames with one name per folder, in sorted folder order."
            )
        return list(IMAGENET_CLASSNAMES)
    names = read_lines(path, "class names")
    if len(names) != len(folder.classes):
        raise LimoeError(
            f"{path} has {len(names)} class names but {folder.root} has {len(folder.classes)} class folders; "
            f"give one name per folder, in sorted folder order."
        )
    return names


def evaluate_zeroshot(model: Limoe, data: str, classnames: Optional[Path] = None, templates: Optional[str] = None,
                      batch_size: int = 64, workers: int = 2, progress: bool = False) -> dict:
    """Zero-shot top-1, top-5 and mean per-class recall of `model` on `data` (any layout above).

    `templates`: 'openai' (default), 'simple' or a file. Returns the metrics plus the numbers of
    samples and classes and the skipped samples by reason.
    """
    prompts = load_templates(templates)  # input errors first, before any encoding
    loader, names = open_classification_set(data, classnames, model.config, batch_size, workers)
    features, labels = encode_labelled_images(model, loader, progress)  # images first: bad data fails fast
    if labels.max() >= len(names):
        raise LimoeError(
            f"{data} has labels up to {labels.max().item()} but only {len(names)} class names; "
            f"give the set's class names with --classnames."
        )
    classifier = zeroshot_classifier(model, names, prompts, progress)  # [D, C]
    return {**classification_metrics(features @ classifier, labels), "samples": len(labels), "classes": len(names),
            "skipped": loader.bad_samples.bad}


def run_zeroshot(checkpoint: Path, data: str, classnames: Optional[str], templates: Optional[str],
                 output: Optional[str], batch_size: int, capacity_factor: Optional[str], device: str,
                 workers: int) -> dict:
    """`limoe eval zeroshot`: load the checkpoint, evaluate, print and optionally save the metrics."""
    if output is not None:
        check_output_file(output, "--output")
    model = load_for_eval(checkpoint, device, capacity_factor)
    metrics = evaluate_zeroshot(model, data, Path(classnames) if classnames else None, templates, batch_size,
                                workers, progress=True)
    report(f"zero-shot classification of {checkpoint} on {data}", metrics, output)
    return metrics
