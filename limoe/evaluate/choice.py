"""Choosing among candidates (`limoe eval choice`): SugarCrepe, Winoground and JSONL item sets.

Uni-Perceiver's formulation of every task: encode the input and each candidate target with the
same tower and pick the most cosine-similar candidate. Each distinct image file and each distinct
text of the whole run is encoded once; an item's scores are the cosine similarities of its
images against its texts, scored by `selection_metrics` (see choice_sets for the layouts).

Reported names: SugarCrepe and JSONL use clip_benchmark's image_caption_selection names (`acc`,
`text_acc`, `image_acc`; per subset as `<subset>/acc`, …), Winoground the paper's (`text_score`,
`image_score`, `group_score`), which are clip_benchmark's `text_acc`, `image_acc` and `acc`.
Beside them each set reports the fraction of items whose right candidate tied for the top score
(`ties`, `text_ties`, `image_ties`; Winoground's `group_ties`), which the tie rule decided, and
its number of `items`.

Ties are real: texts that differ only beyond the model's context length (SugarCrepe's captions
often do at 16 tokens) tokenize identically and get identical features. By default a tie goes to
the earlier candidate, as clip_benchmark's `argmax` gives it (for SugarCrepe the caption, so such
items count as right); `ties="strict"` counts them wrong. A warning says how many items hold
candidates identical after tokenization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from limoe.data.preprocess import eval_transform, tokenizer
from limoe.errors import LimoeError, warn
from limoe.evaluate.choice_sets import ChoiceItem, read_choice_sets
from limoe.evaluate.folders import ImageFiles
from limoe.evaluate.metrics import selection_metrics
from limoe.evaluate.runtime import check_report_output, inference, load_for_eval, report
from limoe.model.tower import Limoe

WINOGROUND_NAMES = {"text_acc": "text_score", "image_acc": "image_score", "acc": "group_score", "ties": "group_ties"}


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


def encode_tokens(model: Limoe, tokens: Tensor, batch_size: int, progress: bool = False) -> Tensor:
    """L2-normalised features [M, D] of token rows [M, L]."""
    features = []
    with inference(model) as device:
        for start in tqdm(range(0, len(tokens), batch_size), desc="texts", unit="batch", disable=not progress):
            features.append(model.encode_text(tokens[start:start + batch_size].to(device)).float().cpu())  # [B, D]
    return torch.cat(features)


def evaluate_choice(model: Limoe, sets: dict[str, list[ChoiceItem]], format: str, batch_size: int = 64,
                    workers: int = 2, progress: bool = False, ties: str = "first") -> dict:
    """Selection metrics of every set (see the module docstring for the names); `ties` is
    `selection_metrics`' tie rule. Texts that tokenize alike are encoded once and score alike to
    the last bit, so they tie exactly."""
    items = [item for set_items in sets.values() for item in set_items]
    files = list(dict.fromkeys(path for item in items for path in item.images))
    texts = list(dict.fromkeys(text for item in items for text in item.texts))
    distinct, token_row = torch.unique(tokenizer(model.config.context_length)(texts), dim=0, return_inverse=True)
    image_features = encode_image_files(model, files, batch_size, workers, progress)  # [N, D]
    text_features = encode_tokens(model, distinct, batch_size, progress)  # [U, D], one per distinct token row [U, L]
    image_row = {path: row for row, path in enumerate(files)}
    text_row = {text: int(row) for text, row in zip(texts, token_row)}

    metrics = {}
    for name, set_items in sets.items():
        rows = [([image_row[p] for p in item.images], [text_row[t] for t in item.texts]) for item in set_items]
        identical = sum(len(set(text_rows)) < len(text_rows) for _, text_rows in rows)
        if identical:
            warn(f"{identical} of {len(set_items)} {name} items have candidate texts that are identical after "
                 f"tokenization at the model's context length of {model.config.context_length} tokens (the difference "
                 f"is cut off), so they tie; --ties {ties} counts such a tie "
                 f"{'wrong' if ties == 'strict' else 'for the earlier candidate'}.")
        scores = [_scores(image_features, text_features, *item_rows) for item_rows in rows]  # [I, T] per item
        values = {**selection_metrics(scores, [item.matches for item in set_items], ties), "items": len(set_items)}
        if format == "winoground":
            values = {WINOGROUND_NAMES.get(key, key): value for key, value in values.items()}
        prefix = f"{name}/" if format == "sugar_crepe" else ""
        metrics.update({f"{prefix}{key}": value for key, value in values.items()})
    return metrics


def _scores(image_features: Tensor, text_features: Tensor, image_rows: list[int], text_rows: list[int]) -> Tensor:
    """Cosine similarities [I, T] of an item's images and texts (rows of the features [N, D] and
    [U, D]). Each distinct pair is computed once and repeated: a matrix product may round equal
    columns differently, which would break an exact tie at random."""
    images, image_index = torch.unique(torch.tensor(image_rows), return_inverse=True)
    texts, text_index = torch.unique(torch.tensor(text_rows), return_inverse=True)
    return (image_features[images] @ text_features[texts].T)[image_index][:, text_index]


def run_choice(checkpoint: Path, data: str, format: str, subsets: Optional[Sequence[str]], output: Optional[str],
               batch_size: int, capacity_factor: Optional[str], device: str, workers: int, ties: str = "first") -> dict:
    """`limoe eval choice`: read the sets (input errors first), load the checkpoint, evaluate, report."""
    check_report_output(output, checkpoint, data)
    sets = read_choice_sets(Path(data), format, subsets)
    model = load_for_eval(checkpoint, device, capacity_factor)
    metrics = evaluate_choice(model, sets, format, batch_size, workers, progress=True, ties=ties)
    report(f"{format} choice of {checkpoint} on {data}", metrics, output)
    return metrics
