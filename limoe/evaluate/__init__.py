"""Evaluation of checkpoints and live models: zero-shot classification, image-text retrieval and
choosing among candidates.

`run_zeroshot` / `run_retrieval` / `run_choice` are the `limoe eval` commands (load a checkpoint,
evaluate, report); `evaluate_zeroshot` / `evaluate_retrieval` / `evaluate_choice` take a model in
memory, e.g. the trainer's; `classification_metrics` / `retrieval_metrics` / `selection_metrics`
are the pure metric functions under them.
"""

from limoe.evaluate.choice import evaluate_choice, run_choice
from limoe.evaluate.metrics import classification_metrics, retrieval_metrics, selection_metrics
from limoe.evaluate.retrieval import evaluate_retrieval, run_retrieval
from limoe.evaluate.zeroshot import evaluate_zeroshot, run_zeroshot

__all__ = [
    "classification_metrics", "retrieval_metrics", "selection_metrics", "evaluate_retrieval", "run_retrieval",
    "evaluate_zeroshot", "run_zeroshot", "evaluate_choice", "run_choice",
]
