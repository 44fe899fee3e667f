"""`limoe eval zeroshot|retrieval|knn --modality video` on the shipped held-out sprite filmstrips,
each checked against a reference worked out here: each clip's frames cut straight from its
filmstrip, made the model's input with `limoe.preprocess_video`, encoded in one forward with
`encode_video` / `encode_text`, and recall, top-1 and k-NN counted by hand (`by_hand`). Dropless
capacity makes every feature independent of its batch-mates, so the commands' batches of an odd
size (23) give the reference's features. And the refusals, each one line."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import limoe
from limoe.checkpoints import load_model
from limoe.data.preprocess import tokenizer
from limoe.data.video import decode_frames
from limoe.evaluate.zeroshot import evaluate_zeroshot
from limoe.prompt_templates import VIDEO_TEMPLATES, load_templates
from tests.evaluate.by_hand import (assert_zeroshot_within, expected_knn_top1, expected_retrieval, shard_members,
                                    zeroshot_bounds)
from tests.helpers import VIDEO_HELDOUT as HELDOUT, refused, run_limoe

CLIPS, CLASSES = 192, 4


@pytest.fixture(scope="module")
def reference(video_checkpoint):
    """Every held-out sample read from the tar members: clips [192, 6, 3, 24, 24] (the centre 6 of
    each strip's 8 frames), caption features, labels, clip features, mean final video tokens
    (normalised), class names, the model."""
    samples = list(shard_members(HELDOUT).values())
    model, config = load_model(video_checkpoint, capacity_factor="dropless")
    model.eval()
    video = config.model.video
    clips = torch.stack([limoe.preprocess_video(decode_frames(s["png"], video.frames, video.frame_stride, "centre"),
                                                model) for s in samples])  # [192, 6, 3, 24, 24]
    captions = [json.loads(s["json"])["text"][0] for s in samples]  # the first caption, as evaluation takes
    with torch.no_grad():
        streams, _ = model.tower({"video": model.embed("video", clips)})
        return {
            "clips": clips, "labels": torch.tensor([int(s["cls"]) for s in samples]),
            "video": model.encode_video(clips), "text": model.encode_text(tokenizer(16)(captions)),
            "tokens": F.normalize(streams["video"].x.mean(dim=1), dim=-1),
            "classnames": (HELDOUT / "classnames.txt").read_text().splitlines(), "model": model,
        }


def _eval(command: str, checkpoint: Path, output: Path, *options: str) -> dict:
    run_limoe(["eval", command, "--checkpoint", str(checkpoint), "--data", str(HELDOUT), "--modality", "video",
               "--output", str(output), "--device", "cpu", "--workers", "0", "--batch-size", "23",
               "--capacity-factor", "dropless", *options])
    return json.loads(output.read_text())


def test_video_text_retrieval_is_recall_counted_by_hand(video_checkpoint, reference, tmp_path):
    metrics = _eval("retrieval", video_checkpoint, tmp_path / "retrieval.json")
    assert metrics.pop("skipped") == {}
    assert metrics == pytest.approx(expected_retrieval(reference["clips"], reference["video"], reference["text"],
                                                       "video"))
    assert metrics["texts"] == CLIPS and metrics["text_to_video_R@10"] > 0  # the reference is not vacuous


def test_video_zeroshot_uses_the_video_templates_and_matches_a_classifier_built_by_hand(video_checkpoint, reference,
                                                                                       tmp_path):
    assert load_templates(None, "video") == VIDEO_TEMPLATES == load_templates("videos")
    assert VIDEO_TEMPLATES[0].format("moving left") == "a video of something moving left."
    metrics = _eval("zeroshot", video_checkpoint, tmp_path / "default.json")  # no --templates: the videos set
    assert metrics.pop("skipped") == {}
    bounds = zeroshot_bounds(reference["model"], reference["video"], reference["labels"], reference["classnames"],
                             VIDEO_TEMPLATES)
    assert_zeroshot_within(metrics, bounds, CLIPS, CLASSES)
    # a one-template file: each class one prompt, so top-1 is an argmax by hand
    (tmp_path / "one.txt").write_text("a sprite {c}\n")
    named = _eval("zeroshot", video_checkpoint, tmp_path / "named.json", "--templates", str(tmp_path / "one.txt"))
    with torch.no_grad():
        classes = reference["model"].encode_text(tokenizer(16)([f"a sprite {c}" for c in reference["classnames"]]))
    expected = (reference["video"] @ classes.T).argmax(dim=1) == reference["labels"]  # [192]
    assert named["top1"] == pytest.approx(expected.float().mean().item())


def test_video_knn_votes_among_the_mean_video_tokens_by_hand(video_checkpoint, reference, tmp_path):
    metrics = _eval("knn", video_checkpoint, tmp_path / "knn.json", "--k", "3")
    assert (metrics["k"], metrics["clips"]) == (3, CLIPS)
    assert metrics["knn_top1"] == pytest.approx(expected_knn_top1(reference["tokens"], reference["labels"], 3))


def test_the_library_function_takes_video_in_train_mode_and_restores_it(reference):
    model = reference["model"]
    model.train()
    metrics = evaluate_zeroshot(model, str(HELDOUT), workers=0, modality="video")
    assert model.training
    bounds = zeroshot_bounds(model, reference["video"], reference["labels"], reference["classnames"], VIDEO_TEMPLATES)
    assert_zeroshot_within({k: v for k, v in metrics.items() if k != "skipped"}, bounds, CLIPS, CLASSES)


def test_a_checkpoint_without_video_asked_for_video_is_one_line_naming_its_modalities(audio_checkpoint):
    for command in ("zeroshot", "retrieval", "knn"):
        refused(["eval", command, "--checkpoint", str(audio_checkpoint), "--data", str(HELDOUT), "--modality",
                 "video", "--device", "cpu", "--workers", "0"], "embeds image, text, audio, not video")
