"""Choosing among candidates (`limoe eval choice`): SugarCrepe, Winoground and JSONL item sets.

Uni-Perceiver's formulation of every task: encode the input and each candidate target with the
same tower and pick the most cosine-similar candidate. Each distinct image file and each distinct
text of the whole run is encoded once; an item's scores are the cosine similarities of its
images against its texts, scored by `selection_metrics` (see choice_sets for the layouts).

Reported names: SugarCrepe and JSONL use clip_benchmark's image_caption_selection names (`acc`,
`text_acc`, `image_acc`; per subset as `<subset>/acc`, …), Winoground the paper's (`text_score`,
`image_score`, `group_score`), which are clip_benchmark's `text_acc`, `image_acc` and `acc`.
Every set also reports its number of `items`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from limoe.data.preprocess import eval_transform, tokenizer
from limoe.errors import LimoeError
from limoe.evaluate.choice_sets import ChoiceItem, read_choice_sets
from limoe.evaluate.folders import ImageFiles
from limoe.evaluate.metrics import selection_metrics
from limoe.evaluate.runtime import check_report_output, inference, load_for_eval, report
from limoe.model.tower import Limoe

WINOGROUND_NAMES = {"text_acc": "text_score", "image_acc": "image_score", "acc": "group_score"}


def encode_image_files(model: Limoe, files: Sequence[Path], batch_size: int, workers: int,
                       progress: bool = False) -> Tensor:
    """L2-normalised features [N, D] of image files, in order, with the eval transform; a file
    that cannot be decoded is an error naming it."""
    dataset = ImageFiles(None, [(path, index) for index, path in enumerate(files)], eval_transform(model.config.image_size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)
    features = []
    with inference(model) as device:
        for records in tqdm(loader, desc="images", unit="batch", disable=not progress):
            unusable = [(key, image) for key, image, _ in records if isinstance(image, str)]
            if unusable:
                key, reason = unusable[0]
                raise LimoeError(f"image {key} is unusable ({reason}); replace it or remove the items using it.")
            images = torch.stack([image for _, image, _ in records])  # [B, 3, H, W]
            features.append(model.encode_image(images.to(device)).float().cpu())  # [B, D]
    return torch.cat(features)


def encode_texts(model: Limoe, texts: Sequence[str], batch_size: int, progress: bool = False) -> Tensor:
    """L2-normalised features [M, D] of texts, in order, tokenized at the model's context length."""
    tokenize = tokenizer(model.config.context_length)
    features = []
    with inference(model) as device:
        for start in tqdm(range(0, len(texts), batch_size), desc="texts", unit="batch", disable=not progress):
            tokens = tokenize(list(texts[start:start + batch_size]))  # [B, L]
            features.append(model.encode_text(tokens.to(device)).float().cpu())  # [B, D]
    return torch.cat(features)


def evaluate_choice(model: Limoe, sets: dict[str, list[ChoiceItem]], format: str, batch_size: int = 64,
                    workers: int = 2, progress: bool = False) -> dict:
    """Selection metrics of every set (see the module docstring for the names)."""
    items = [item for set_items in sets.values() for item in set_items]
    files = list(dict.fromkeys(path for item in items for path in item.images))
    texts = list(dict.fromkeys(text for item in items for text in item.texts))
    image_features = encode_image_files(model, files, batch_size, workers, progress)  # [N, D]
    text_features = encode_texts(model, texts, batch_size, progress)  # [M, D]
    image_row = {path: row for row, path in enumerate(files)}
    text_row = {text: row for row, text in enumerate(texts)}

    metrics = {}
    for name, set_items in sets.items():
        scores = [image_features[[image_row[p] for p in item.images]] @ text_features[[text_row[t] for t in item.texts]].T
                  for item in set_items]  # [I, T] per item
        values = {**selection_metrics(scores, [item.matches for item in set_items]), "items": len(set_items)}
        if format == "winoground":
            values = {WINOGROUND_NAMES.get(key, key): value for key, value in values.items()}
        prefix = f"{name}/" if format == "sugar_crepe" else ""
        metrics.update({f"{prefix}{key}": value for key, value in values.items()})
    return metrics


def run_choice(checkpoint: Path, data: str, format: str, subsets: Optional[Sequence[str]], output: Optional[str],
               batch_size: int, capacity_factor: Optional[str], device: str, workers: int) -> dict:
    """`limoe eval choice`: read the sets (input errors first), load the checkpoint, evaluate, report."""
    check_report_output(output, checkpoint, data)
    sets = read_choice_sets(Path(data), format, subsets)
    model = load_for_eval(checkpoint, device, capacity_factor)
    metrics = evaluate_choice(model, sets, format, batch_size, workers, progress=True)
    report(f"{format} choice of {checkpoint} on {data}", metrics, output)
    return metrics
