"""`limoe tune`: few-shot prompt tuning of a checkpoint on a labelled set, and how it compares.

Reads the set once with the checkpoint as it is (zero-shot features of every image, or audio
clip with `--modality audio`, and the K-shot support inputs), tunes (limoe.tuning.prompt_tuning), writes the tuned model file, and
scores the samples left out of the support set (the queries) three ways: zero-shot, the best
linear probe on the same shots (limoe.tuning.probe), and the tuned model. The tuned file is a
model file like `limoe export`'s, with the prompt tokens and label head among its tensors and
the label set, templates, modality and recipe in its metadata; `limoe eval zeroshot` (with the
same `--modality`) uses it as it is.
Under the metrics it prints where the time went (reading and encoding the set, the baselines, the
tuning steps, scoring the tuned model): on a CPU the encoding passes, not the steps, often dominate.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from limoe.checkpoints import load_model, save_model_file
from limoe.checkpoints.training import checkpoint_sources
from limoe.distributed import resolve_device
from limoe.errors import LimoeError
from limoe.evaluate.inputs import check_modality
from limoe.evaluate.metrics import classification_metrics
from limoe.prompt_templates import load_templates
from limoe.evaluate.runtime import report
from limoe.evaluate.zeroshot import open_classification_set, zeroshot_classifier
from limoe.files import check_output_file, refuse_overwriting_inputs
from limoe.model.prompts import add_prompt_tuning, classification_logits, label_head
from limoe.tuning.few_shot import FewShotSplit, read_few_shot_split
from limoe.tuning.probe import best_linear_probe
from limoe.tuning.prompt_tuning import TuneRecipe, template_strings, tune_prompts

RECIPE_KEY = "limoe_prompt_tuning"  # tuned-file metadata: recipe, support set and base checkpoint, as JSON


def run_tune(checkpoint: Path, data: str, classnames: Optional[str], templates: Optional[str], shots: int,
             recipe: TuneRecipe, output: str | Path, metrics_output: Optional[str] = None, batch_size: int = 64,
             capacity_factor: Optional[str] = None, device: str = "auto", workers: int = 2,
             modality: str = "image") -> dict:
    """Tune `checkpoint` on K shots per class of `data` (images, or with `modality="audio"` the
    clips of audio shards with .cls), write `output`, and report query metrics."""
    if shots < 1:
        raise LimoeError(f"--shots {shots}: give at least one support sample per class.")
    output = check_output_file(output, "--output")  # input errors first, before any work
    if metrics_output is not None:
        check_output_file(metrics_output, "--metrics")
    refuse_overwriting_inputs({"--output": output, "--metrics": metrics_output},
                              [*checkpoint_sources(checkpoint), data, classnames, templates])
    prompts = template_strings(load_templates(templates, modality))
    seconds: dict[str, float] = {}
    with _timed(seconds, "loading"):
        model, config = load_model(checkpoint, resolve_device(device), capacity_factor)
    check_modality(model, modality)
    if label_head(model) is not None:
        raise LimoeError(f"{checkpoint} is already prompt-tuned; tune the model it was tuned from.")
    loader, names = open_classification_set(data, Path(classnames) if classnames else None, model.config,
                                            batch_size, workers, modality=modality)
    with _timed(seconds, "encoding"):
        split = read_few_shot_split(model, loader, shots, recipe.seed, progress=True, modality=modality)
    if split.labels.max() >= len(names):
        raise LimoeError(f"{data} has labels up to {split.labels.max().item()} but only {len(names)} class names; "
                         f"give the set's class names with --classnames.")
    with _timed(seconds, "baselines"):
        metrics = {"classes": len(names), "shots": shots, "support": int(split.support.sum()),
                   "queries": int(split.queries.sum()), **_baselines(model, split, names, prompts)}

    with _timed(seconds, f"{recipe.steps} steps"):
        add_prompt_tuning(model, recipe.prompt_tokens, names, prompts,
                          generator=torch.Generator().manual_seed(recipe.seed), modality=modality)
        losses = tune_prompts(model, split.support_inputs, split.support_labels, names, prompts, recipe, progress=True,
                              modality=modality)
    if losses:
        metrics.update(first_loss=losses[0], last_loss=losses[-1])
    notes = {RECIPE_KEY: json.dumps({"checkpoint": str(checkpoint), "data": data, "modality": modality, "shots": shots,
                                     "support": metrics["support"], **dataclasses.asdict(recipe)})}
    save_model_file(model, config, output, notes)

    if metrics["queries"]:
        with _timed(seconds, "evaluation"):
            tuned = read_few_shot_split(model, loader, shots, recipe.seed, modality=modality)  # the tuned model's features
            rows = {key: row for row, key in enumerate(tuned.keys)}
            features = tuned.features[[rows[key] for key in split.keys]]  # [N, D] in the first pass's order
            logits = classification_logits(model, features, zeroshot_classifier(model, names, prompts))
            queries = split.queries
            metrics.update({f"tuned_{name}": value
                            for name, value in classification_metrics(logits[queries], split.labels[queries]).items()})
    report(f"prompt tuning of {checkpoint} on {shots} shots per class of {data} → {output}", metrics, metrics_output)
    print("time: " + ", ".join(f"{phase} {value:.1f} s" for phase, value in seconds.items()))
    return metrics


@contextmanager
def _timed(seconds: dict[str, float], phase: str):
    """Record the wall time of the `with` body as `seconds[phase]`."""
    start = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - start


def _baselines(model, split: FewShotSplit, names: list[str], prompts: list[str]) -> dict:
    """Query metrics of zero-shot classification and of the best linear probe on the support features."""
    if not split.queries.any():
        return {}
    queries, support = split.queries, split.support
    logits = classification_logits(model, split.features, zeroshot_classifier(model, names, prompts))  # [N, C]
    zeroshot = classification_metrics(logits[queries], split.labels[queries])
    probe = best_linear_probe(split.features[support], split.labels[support], split.features[queries],
                              split.labels[queries], len(names))
    return {**{f"zeroshot_{name}": value for name, value in zeroshot.items()}, **probe}
