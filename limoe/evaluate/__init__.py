"""Evaluation of checkpoints and live models: zero-shot classification and image-text retrieval.

`run_zeroshot` / `run_retrieval` are the `limoe eval` commands (load a checkpoint, evaluate,
report); `evaluate_zeroshot` / `evaluate_retrieval` take a model in memory, e.g. the trainer's;
`classification_metrics` / `retrieval_metrics` are the pure metric functions under both.
"""

from limoe.evaluate.metrics import classification_metrics, retrieval_metrics
from limoe.evaluate.retrieval import evaluate_retrieval, run_retrieval
from limoe.evaluate.zeroshot import evaluate_zeroshot, run_zeroshot

__all__ = [
    "classification_metrics", "retrieval_metrics", "evaluate_retrieval", "run_retrieval", "evaluate_zeroshot",
    "run_zeroshot",
]
