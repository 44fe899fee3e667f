"""Evaluation during training: `eval.zeroshot` and `eval.retrieval` on the live model every
`train.eval_every` steps, so a run draws its zero-shot curve as it goes (open_clip's
`--zeroshot-frequency`).

It calls the very functions behind `limoe eval`, on the model the engine trains, in eval mode
(no router noise, the eval capacity factor); a step's numbers therefore equal `limoe eval` on
that step's checkpoint. Every rank reads the whole set and the ranks take turns encoding it
(`limoe.evaluate.turns`): under expert parallelism each MoE layer's forward is an all-to-all that
needs every rank, so all ranks run every forward together, each on its own batch, and gather the
features; every rank ends with the same numbers, having encoded about 1/W of the set.
"""

from __future__ import annotations

from pathlib import Path

from limoe.config import Config
from limoe.data.pipeline import expand_shards
from limoe.errors import LimoeError
from limoe.evaluate import evaluate_retrieval, evaluate_zeroshot
from limoe.prompt_templates import load_templates
from limoe.evaluate.zeroshot import open_classification_set
from limoe.model.tower import Limoe


def check_eval_sets(config: Config) -> None:
    """Fail in one line, before anything is built, on an evaluation set that cannot be opened
    (its loader and class names are set up as an evaluation will; no image is read)."""
    settings = config.eval
    if settings.zeroshot.data is not None:
        load_templates(settings.zeroshot.templates)
        classnames = settings.zeroshot.classnames
        if classnames is not None and not Path(classnames).is_file():
            raise LimoeError(f"eval.zeroshot.classnames: {classnames} is not a file; give a file with one class name "
                             f"per line, or null for the set's own.")
        try:
            open_classification_set(settings.zeroshot.data, Path(classnames) if classnames else None, config.model,
                                    settings.batch_size, workers=0)
        except LimoeError as error:
            raise LimoeError(f"eval.zeroshot.data: {error}") from None
    if settings.retrieval is not None:
        try:
            expand_shards(settings.retrieval)
        except LimoeError as error:
            raise LimoeError(f"eval.retrieval: {error}") from None


def evaluate_live(model: Limoe, config: Config) -> dict:
    """{"zeroshot": metrics, "retrieval": metrics} for the configured sets (the model's mode is
    restored afterwards). Every rank must call this at the same step."""
    settings, results = config.eval, {}
    workers = config.data.workers
    placement = {"resize_on": config.data.resize_on, "decode_on": config.data.decode_on}  # as training's images
    if settings.zeroshot.data is not None:
        classnames = Path(settings.zeroshot.classnames) if settings.zeroshot.classnames else None
        results["zeroshot"] = evaluate_zeroshot(model, settings.zeroshot.data, classnames, settings.zeroshot.templates,
                                                settings.batch_size, workers, shared=True, **placement)
    if settings.retrieval is not None:
        results["retrieval"] = evaluate_retrieval(model, settings.retrieval, settings.batch_size, workers, shared=True,
                                                  **placement)
    return results
