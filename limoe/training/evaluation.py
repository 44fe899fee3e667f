"""Evaluation during training: `eval.zeroshot` and `eval.retrieval` (and, for a model with audio,
their `eval.audio` twins) on the live model every `train.eval_every` steps, so a run draws its
zero-shot curve as it goes (open_clip's `--zeroshot-frequency`).

It calls the very functions behind `limoe eval`, on the model the engine trains, in eval mode
(no router noise, the eval capacity factor); a step's numbers therefore equal `limoe eval` (with
`--modality audio` for the audio sets) on that step's checkpoint. Every rank reads the whole set
and the ranks take turns encoding it (`limoe.evaluate.turns`): under expert parallelism each MoE
layer's forward is an all-to-all that needs every rank, so all ranks run every forward together,
each on its own batch, and gather the features; every rank ends with the same numbers, having
encoded about 1/W of the set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from limoe.config import Config
from limoe.config.evaluation import ZeroshotEvalConfig
from limoe.data.pipeline import expand_shards
from limoe.errors import LimoeError
from limoe.evaluate import evaluate_retrieval, evaluate_zeroshot
from limoe.prompt_templates import load_templates
from limoe.evaluate.zeroshot import open_classification_set
from limoe.model.tower import Limoe


def _eval_sets(config: Config) -> list[tuple[str, str, ZeroshotEvalConfig, Optional[str]]]:
    """(modality, key prefix, zero-shot settings, retrieval shards) of each modality evaluated:
    images always, audio when the model has it (the config refuses audio sets otherwise)."""
    settings = config.eval
    sets = [("image", "eval.", settings.zeroshot, settings.retrieval)]
    if "audio" in config.model.modalities:
        sets.append(("audio", "eval.audio.", settings.audio.zeroshot, settings.audio.retrieval))
    return sets


def check_eval_sets(config: Config) -> None:
    """Fail in one line, before anything is built, on an evaluation set that cannot be opened
    (its loader and class names are set up as an evaluation will; no sample is read)."""
    for modality, prefix, zeroshot, retrieval in _eval_sets(config):
        if zeroshot.data is not None:
            load_templates(zeroshot.templates, modality)
            classnames = zeroshot.classnames
            if classnames is not None and not Path(classnames).is_file():
                raise LimoeError(f"{prefix}zeroshot.classnames: {classnames} is not a file; give a file with one "
                                 f"class name per line, or null for the set's own.")
            try:
                open_classification_set(zeroshot.data, Path(classnames) if classnames else None, config.model,
                                        config.eval.batch_size, workers=0, modality=modality)
            except LimoeError as error:
                raise LimoeError(f"{prefix}zeroshot.data: {error}") from None
        if retrieval is not None:
            try:
                expand_shards(retrieval)
            except LimoeError as error:
                raise LimoeError(f"{prefix}retrieval: {error}") from None


def evaluate_live(model: Limoe, config: Config) -> dict:
    """{"zeroshot": metrics, "retrieval": metrics, "audio": {"zeroshot": …, "retrieval": …}} for the
    configured sets (the model's mode is restored afterwards). Every rank must call this at the
    same step."""
    results: dict = {}
    batch_size, workers = config.eval.batch_size, config.data.workers
    for modality, _, zeroshot, retrieval in _eval_sets(config):
        # images are placed as training's are; audio clips have no placement
        placement = {"resize_on": config.data.resize_on, "decode_on": config.data.decode_on} if modality == "image" \
            else {"modality": modality}
        found = {}
        if zeroshot.data is not None:
            classnames = Path(zeroshot.classnames) if zeroshot.classnames else None
            found["zeroshot"] = evaluate_zeroshot(model, zeroshot.data, classnames, zeroshot.templates, batch_size,
                                                  workers, shared=True, **placement)
        if retrieval is not None:
            found["retrieval"] = evaluate_retrieval(model, retrieval, batch_size, workers, shared=True, **placement)
        if modality == "image":
            results.update(found)
        elif found:
            results[modality] = found
    return results
