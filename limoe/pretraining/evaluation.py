"""Held-out measurements of masked pretraining, each beside the baseline it must beat.

Masked images (or audio or video clips): the normalised-patch MSE of the hidden patches against predicting
zero (the mean square of the normalised targets). Masked captions: accuracy on the masked tokens against always
answering the most frequent of them (the best constant answer on this very set). Every task of
both stages is measured as it is trained, in eval mode (no router noise, the eval capacity
factor); masks are drawn per batch from fixed seeds, so checkpoints are compared on the same masks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Union

import torch

from limoe.data.pipeline import EvalBatch, eval_loader, loader_options
from limoe.evaluate.runtime import inference, nothing_read
from limoe.pretraining.losses import patch_errors
from limoe.pretraining.objective import MaskedPretraining, PatchPrediction, TokenPrediction, stage_tasks

EVAL_SEED_STEP = 1 << 40  # held-out batch i is masked as step EVAL_SEED_STEP + i, never a training step


@dataclass
class _PatchScore:
    error: float = 0.0  # Σ over hidden patches of the per-patch MSE
    zero_error: float = 0.0  # the same for a prediction of zeros
    patches: int = 0

    def add(self, out: PatchPrediction) -> None:
        self.error += patch_errors(out.prediction, out.target)[out.hidden].sum().item()
        self.zero_error += patch_errors(torch.zeros_like(out.target), out.target)[out.hidden].sum().item()
        self.patches += int(out.hidden.sum())

    def result(self) -> dict:
        return {"mse": self.error / self.patches, "zero_mse": self.zero_error / self.patches, "patches": self.patches}


@dataclass
class _TextScore:
    correct: int = 0
    targets: Counter = field(default_factory=Counter)  # how often each id was to be predicted

    def add(self, out: TokenPrediction) -> None:
        self.correct += int((out.logits.argmax(dim=-1) == out.targets).sum())
        self.targets.update(out.targets.tolist())

    def result(self) -> dict:
        tokens = max(sum(self.targets.values()), 1)
        most_frequent = max(self.targets.values(), default=0)
        return {"accuracy": self.correct / tokens, "most_frequent_accuracy": most_frequent / tokens, "tokens": tokens}


def evaluate_masked_modelling(objective: MaskedPretraining, data: Union[str, Iterable[EvalBatch]],
                              batch_size: int = 128, workers: int = 2) -> dict:
    """{task name: image, audio or video tasks' mse, zero_mse, patches / text tasks' accuracy,
    most_frequent_accuracy, tokens} on caption shards of `pretrain.modalities` (a spec) or any
    iterable of EvalBatches with tokens."""
    config, (inputs, _) = objective.model.config, objective.modalities
    loader = data if not isinstance(data, str) else eval_loader(
        data, batch_size, config.image_size, config.context_length, workers, max_bad_fraction=1.0, rank=0,
        world_size=1, **loader_options(config, inputs)
    )
    tasks = [task for stage in stage_tasks(objective.modalities).values() for task in stage]
    scores = {task.name: _TextScore() if task.predicts == "text" else _PatchScore() for task in tasks}
    with inference(objective) as device:
        for index, batch in enumerate(loader):
            batch_inputs, tokens = batch.images.to(device), batch.tokens.to(device)
            for task in tasks:
                out, _ = objective.predict(task, batch_inputs, tokens, EVAL_SEED_STEP + index)
                scores[task.name].add(out)
    if not scores[tasks[0].name].patches:
        raise nothing_read(loader, f"masked modelling needs {inputs}–caption shards (pretrain.modalities "
                                   f"{list(objective.modalities)})")
    return {name: score.result() for name, score in scores.items()}
