"""`limoe eval zeroshot|retrieval|knn --modality audio` on the shipped held-out instrument clips,
each checked against a reference worked out here: the clips read straight from the shards, encoded
in one forward with `encode_audio` / `encode_text`, and recall, top-1 and k-NN counted by hand.
Dropless capacity makes every feature independent of its batch-mates, so the commands' batches of
an odd size (17) give the reference's features. And the refusals, each one line."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from limoe.checkpoints import load_model
from limoe.data.audio import decode_clip
from limoe.data.preprocess import tokenizer
from limoe.errors import LimoeError
from limoe.evaluate.knn import evaluate_knn
from limoe.evaluate.retrieval import evaluate_retrieval
from limoe.evaluate.zeroshot import evaluate_zeroshot
from limoe.prompt_templates import SOUND_TEMPLATES
from tests.evaluate.by_hand import (assert_retrieval_within, assert_zeroshot_within, expected_knn_top1, retrieval_bounds,
                                    shard_members, zeroshot_bounds)
from tests.helpers import AUDIO_HELDOUT as HELDOUT, VIDEO_HELDOUT, refused, run_limoe



@pytest.fixture(scope="module")
def reference(audio_checkpoint):
    """Every held-out sample read from the tar members: clips [64, T], caption features [64, D],
    labels [64], clip features [64, D], mean final audio tokens [64, d] (normalised), class names."""
    samples = list(shard_members(HELDOUT).values())
    clips = torch.stack([torch.from_numpy(decode_clip(s["flac"], 16000, 1.0, "centre")) for s in samples])  # [64, T]
    captions = [json.loads(s["json"])["text"][0] for s in samples]  # the first caption, as evaluation takes
    labels = torch.tensor([int(s["cls"]) for s in samples])  # [64]
    model, _ = load_model(audio_checkpoint, capacity_factor="dropless")
    model.eval()
    with torch.no_grad():
        streams, _ = model.tower({"audio": model.embed("audio", clips)})
        return {
            "clips": clips, "labels": labels,
            "audio": model.encode_audio(clips), "text": model.encode_text(tokenizer(16)(captions)),
            "tokens": F.normalize(streams["audio"].x.mean(dim=1), dim=-1),
            "classnames": (HELDOUT / "classnames.txt").read_text().split("\n")[:16], "model": model,
        }


def _eval(command: str, checkpoint: Path, output: Path, *options: str) -> dict:
    run_limoe(["eval", command, "--checkpoint", str(checkpoint), "--data", str(HELDOUT), "--modality", "audio",
               "--output", str(output), "--device", "cpu", "--workers", "0", "--batch-size", "17",
               "--capacity-factor", "dropless", *options])
    return json.loads(output.read_text())


def _retrieval_bounds(reference) -> tuple[dict, dict]:
    """Two General MIDI programs render the same sound in both their clips: one clip, two captions."""
    return retrieval_bounds(reference["clips"], reference["audio"], reference["text"], "audio")


def _assert_zeroshot_as_by_hand(metrics: dict, reference) -> None:
    bounds = zeroshot_bounds(reference["model"], reference["audio"], reference["labels"], reference["classnames"],
                             SOUND_TEMPLATES)
    assert_zeroshot_within(metrics, bounds, 64, 16)


def _expected_knn_top1(reference, k: int) -> float:
    return expected_knn_top1(reference["tokens"], reference["labels"], k)


def test_audio_text_retrieval_is_recall_counted_by_hand(audio_checkpoint, reference, tmp_path):
    metrics = _eval("retrieval", audio_checkpoint, tmp_path / "retrieval.json")
    assert metrics.pop("skipped") == {}
    assert_retrieval_within(metrics, _retrieval_bounds(reference))
    assert (metrics["clips"], metrics["texts"]) == (64, 64)  # every clip a sound of its own
    assert metrics["text_to_audio_R@10"] > 0  # the reference is not vacuous


def test_audio_zeroshot_uses_the_sound_templates_and_matches_a_classifier_built_by_hand(audio_checkpoint, reference,
                                                                                       tmp_path):
    metrics = _eval("zeroshot", audio_checkpoint, tmp_path / "default.json")  # no --templates: the sounds set
    assert metrics.pop("skipped") == {}
    _assert_zeroshot_as_by_hand(metrics, reference)
    assert metrics["top5"] > 0
    # --templates and --classnames work as for images: one template, names from a file
    names, model = reference["classnames"], reference["model"]
    (tmp_path / "one.txt").write_text("{c} sound\n")
    (tmp_path / "names.txt").write_text("\n".join(reversed(names)) + "\n")
    named = _eval("zeroshot", audio_checkpoint, tmp_path / "named.json", "--templates", str(tmp_path / "one.txt"),
                  "--classnames", str(tmp_path / "names.txt"))
    with torch.no_grad():
        reversed_classes = model.encode_text(tokenizer(16)([f"{name} sound" for name in reversed(names)]))  # [16, D]
    expected = (reference["audio"] @ reversed_classes.T).argmax(dim=1) == reference["labels"]
    assert named["top1"] == pytest.approx(expected.float().mean().item())


def test_audio_knn_votes_among_the_mean_audio_tokens_by_hand(audio_checkpoint, reference, tmp_path):
    metrics = _eval("knn", audio_checkpoint, tmp_path / "knn.json", "--k", "3")
    assert (metrics["k"], metrics["clips"]) == (3, 64)
    assert metrics["knn_top1"] == pytest.approx(_expected_knn_top1(reference, 3))


def test_the_library_functions_take_the_modality(reference):
    """In memory, as the trainer calls them (in train mode, restored afterwards): the reference's numbers."""
    model = reference["model"]
    model.train()
    retrieval = evaluate_retrieval(model, str(HELDOUT), batch_size=64, workers=0, modality="audio")
    knn = evaluate_knn(model, str(HELDOUT), k=3, workers=0, modality="audio")
    zeroshot = evaluate_zeroshot(model, str(HELDOUT), workers=0, modality="audio")
    assert model.training
    assert retrieval.pop("skipped") == zeroshot.pop("skipped") == {}
    assert_retrieval_within(retrieval, _retrieval_bounds(reference))
    assert knn["knn_top1"] == pytest.approx(_expected_knn_top1(reference, 3))
    _assert_zeroshot_as_by_hand(zeroshot, reference)
    with pytest.raises(LimoeError, match="modality 'text' cannot be evaluated; give one of image, audio"):
        evaluate_knn(model, str(HELDOUT), workers=0, modality="text")


def test_an_image_text_checkpoint_asked_for_audio_is_one_line_naming_its_modalities(checkpoint):
    for command in ("zeroshot", "retrieval", "knn"):
        refused(["eval", command, "--checkpoint", str(checkpoint), "--data", str(HELDOUT), "--modality", "audio",
                 "--device", "cpu", "--workers", "0"], "embeds image, text, not audio")


@pytest.mark.parametrize("modality, data", [("audio", HELDOUT), ("video", VIDEO_HELDOUT)])
@pytest.mark.parametrize("options, expected", [
    (["--resize-on", "device"], "--resize-on and --decode-on place"),
    (["--resize-on", "device", "--decode-on", "device"], "drop them with --modality {modality}"),
])
def test_image_placement_options_are_refused_for_clips_before_the_checkpoint_is_read(tmp_path, options, expected,
                                                                                     modality, data):
    missing = tmp_path / "no-such-model.safetensors"  # never opened: the refusal comes first
    for command in ("zeroshot", "retrieval", "knn"):
        refused(["eval", command, "--checkpoint", str(missing), "--data", str(data), "--modality", modality,
                 *options], expected.format(modality=modality))


def test_image_sets_and_exemplar_images_are_refused_for_audio(audio_checkpoint, tmp_path):
    for name, colour in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        (tmp_path / "pets" / name).mkdir(parents=True)
        Image.new("RGB", (12, 10), colour).save(tmp_path / "pets" / name / "0.png")
    base = ["eval", "zeroshot", "--checkpoint", str(audio_checkpoint), "--modality", "audio", "--device", "cpu",
            "--workers", "0"]
    refused([*base, "--data", str(tmp_path / "pets")], "class-folder tree, which is read as images",
            "limoe shards build --audio")
    refused([*base, "--data", str(HELDOUT), "--candidate-images", str(tmp_path / "pets")],
            "--candidate-images gives the classes by example images")
