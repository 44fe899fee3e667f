"""`limoe tune --modality audio`: the few-shot baselines on a model's audio features equal those
computed from the shards' clips another way (read from the tar files, turned into inputs by
`limoe.preprocess_audio`, encoded by `encode_audio`), and the tuned file classifies clips, not images."""

import json

import torch

import limoe
from limoe.evaluate.metrics import classification_metrics
from limoe.evaluate.zeroshot import zeroshot_classifier
from limoe.model.prompts import classification_logits
from limoe.prompt_templates import load_templates
from limoe.tuning.few_shot import support_priority
from limoe.tuning.probe import best_linear_probe
from tests.helpers import AUDIO_HELDOUT, ROOT, refused, run_limoe, shard_members

SHOTS = 3


def _tune_args(checkpoint, output, *options: str) -> list[str]:
    return ["tune", "--checkpoint", str(checkpoint), "--data", str(AUDIO_HELDOUT), "--shots", str(SHOTS),
            "--steps", "0", "--output", str(output), "--device", "cpu", "--workers", "0",
            "--capacity-factor", "dropless", *options]


def _heldout_clips(model) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Keys, clips [N, T] and labels [N] of the held-out audio shards, in shard order, read from
    the tar files directly."""
    members = shard_members(AUDIO_HELDOUT)
    keys = list(members)
    clips = torch.stack([limoe.preprocess_audio(members[key]["flac"], model) for key in keys])  # [N, T]
    return keys, clips, torch.tensor([int(members[key]["cls"]) for key in keys])


def test_audio_baselines_equal_those_of_the_clips_encoded_directly(audio_checkpoint, tmp_path):
    metrics_file = tmp_path / "metrics.json"
    run_limoe(_tune_args(audio_checkpoint, tmp_path / "tuned.safetensors", "--modality", "audio",
                         "--metrics", str(metrics_file)))
    metrics = json.loads(metrics_file.read_text())

    model = limoe.create_model(str(audio_checkpoint), capacity_factor="dropless")
    names = (AUDIO_HELDOUT / "classnames.txt").read_text().splitlines()
    keys, clips, labels = _heldout_clips(model)
    with torch.no_grad():
        features = model.encode_audio(clips)  # [N, D]
    support = torch.zeros(len(keys), dtype=torch.bool)
    for label in labels.unique().tolist():
        rows = [row for row in range(len(keys)) if labels[row] == label]
        for row in sorted(rows, key=lambda row: support_priority(0, keys[row]))[:SHOTS]:
            support[row] = True
    queries = ~support
    expected = best_linear_probe(features[support], labels[support], features[queries], labels[queries], len(names))
    with torch.no_grad():
        classifier = zeroshot_classifier(model, names, load_templates(None, "audio"))  # the 'sounds' templates
        zeroshot = classification_metrics(classification_logits(model, features, classifier)[queries], labels[queries])

    assert metrics["support"] == int(support.sum()) and metrics["queries"] == int(queries.sum())
    assert metrics["linear_probe_top1"] == expected["linear_probe_top1"]
    assert metrics["linear_probe_weight_decay"] == expected["linear_probe_weight_decay"]
    assert metrics["zeroshot_top1"] == zeroshot["top1"]


def test_an_audio_tuned_file_classifies_clips_and_refuses_images(audio_checkpoint, tmp_path):
    """At step 0 the tuned file predicts what its base model predicts, on clips; its label head reads
    audio embeddings, so an image evaluation of it is one line."""
    tuned = tmp_path / "tuned.safetensors"
    run_limoe(_tune_args(audio_checkpoint, tuned, "--modality", "audio"))
    results = {}
    for name, source in (("base", audio_checkpoint), ("tuned", tuned)):
        output = tmp_path / f"{name}.json"
        run_limoe(["eval", "zeroshot", "--checkpoint", str(source), "--data", str(AUDIO_HELDOUT), "--modality", "audio",
                   "--output", str(output), "--device", "cpu", "--workers", "0", "--capacity-factor", "dropless"])
        results[name] = json.loads(output.read_text())
    assert results["tuned"] == results["base"]
    refused(["eval", "zeroshot", "--checkpoint", str(tuned), "--data", str(ROOT / "data_shards" / "heldout_cls"),
             "--device", "cpu", "--workers", "0"], "prompt-tuned on clips", "--modality audio")


def test_tuning_on_audio_needs_a_model_with_audio(checkpoint, tmp_path):
    refused(_tune_args(checkpoint, tmp_path / "tuned.safetensors", "--modality", "audio"),
            "embeds image, text, not audio")
