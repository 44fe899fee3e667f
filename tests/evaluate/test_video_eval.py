"""`limoe eval zeroshot|retrieval|knn --modality video` on the shipped held-out sprite filmstrips,
each checked against a reference worked out here: each clip's frames cut straight from its
filmstrip, made the model's input with `limoe.preprocess_video`, encoded in one forward with
`encode_video` / `encode_text`, and recall, top-1 and k-NN counted by hand (`by_hand`). Dropless
capacity makes every feature independent of its batch-mates, so the commands' batches of an odd
size (23) give the reference's features. `--still-frame` against the same reference with each
clip's centre frame (the 4th of 6) repeated, and on clips that are still already. And the
refusals, each one line."""

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import limoe
from limoe.checkpoints import load_model
from limoe.data.pipeline import eval_loader, loader_options
from limoe.data.preprocess import tokenizer
from limoe.data.shards import write_shards
from limoe.data.video import decode_frames
from limoe.evaluate.zeroshot import encode_labelled_images, evaluate_zeroshot
from limoe.prompt_templates import VIDEO_TEMPLATES, load_templates
from tests.evaluate.by_hand import (assert_retrieval_within, assert_zeroshot_within, expected_knn_top1,
                                    retrieval_bounds, shard_members, zeroshot_bounds)
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
            "clips": clips, "still_video": model.encode_video(clips[:, [3] * 6]), "labels": torch.tensor([int(s["cls"]) for s in samples]),
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
    assert_retrieval_within(metrics, retrieval_bounds(reference["clips"], reference["video"], reference["text"], "video"))
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
    # a one-template file: each class one prompt
    (tmp_path / "one.txt").write_text("a sprite {c}\n")
    named = _eval("zeroshot", video_checkpoint, tmp_path / "named.json", "--templates", str(tmp_path / "one.txt"))
    named.pop("skipped")
    bounds = zeroshot_bounds(reference["model"], reference["video"], reference["labels"], reference["classnames"],
                             ["a sprite {}"])
    assert_zeroshot_within(named, bounds, CLIPS, CLASSES)


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


def test_still_frame_scores_each_clip_as_its_centre_frame_repeated(video_checkpoint, reference, tmp_path):
    model, still = reference["model"], reference["still_video"]  # [192, D]: frame 3 of 6, six times
    model.eval()  # as the reference was encoded (another test leaves it training)
    assert not torch.allclose(still, reference["video"], atol=1e-3)  # the flag has something to change
    (tmp_path / "one.txt").write_text("a sprite {c}\n")
    zeroshot = _eval("zeroshot", video_checkpoint, tmp_path / "zeroshot.json", "--templates", str(tmp_path / "one.txt"),
                     "--still-frame")
    zeroshot.pop("skipped")
    bounds = zeroshot_bounds(model, still, reference["labels"], reference["classnames"], ["a sprite {}"])
    assert_zeroshot_within(zeroshot, bounds, CLIPS, CLASSES)
    retrieval = _eval("retrieval", video_checkpoint, tmp_path / "retrieval.json", "--still-frame")
    retrieval.pop("skipped")
    assert_retrieval_within(retrieval, retrieval_bounds(reference["clips"], still, reference["text"], "video"))
    knn = _eval("knn", video_checkpoint, tmp_path / "knn.json", "--k", "3", "--still-frame")
    with torch.no_grad():
        streams, _ = model.tower({"video": model.embed("video", reference["clips"][:, [3] * 6])})
    tokens = F.normalize(streams["video"].x.mean(dim=1), dim=-1)  # [192, d]
    assert knn["knn_top1"] == pytest.approx(expected_knn_top1(tokens, reference["labels"], 3))


def _still_filmstrip(png: bytes) -> bytes:
    """A filmstrip of the same length as `png`'s whose every frame is `png`'s first."""
    strip = Image.open(io.BytesIO(png)).convert("RGB")
    frame, still = strip.crop((0, 0, strip.height, strip.height)), Image.new("RGB", strip.size)
    for index in range(strip.width // strip.height):
        still.paste(frame, (index * strip.height, 0))
    encoded = io.BytesIO()
    still.save(encoded, format="PNG")
    return encoded.getvalue()


def test_a_clip_that_is_still_already_reads_the_same_with_and_without_still_frame(reference, tmp_path):
    samples = [{"__key__": key.replace("/", "_").replace(".", "_"), "png": _still_filmstrip(sample["png"]),
                "cls": sample["cls"]} for key, sample in list(shard_members(HELDOUT).items())[:13]]
    write_shards(samples, tmp_path / "%05d.tar", 13, compress=False)
    model = reference["model"]

    def features(still_frame: bool) -> torch.Tensor:
        loader = eval_loader(str(tmp_path), 5, model.config.image_size, model.config.context_length, 0,
                             classification=True, **loader_options(model.config, "video"))
        return encode_labelled_images(model, loader, modality="video", still_frame=still_frame)[0]  # [13, D]

    # equal up to float rounding: the loader's batch and its repeated-frame copy lie differently in memory
    assert torch.allclose(features(True), features(False), rtol=0, atol=1e-6)


def test_still_frame_with_images_or_audio_is_one_line_naming_video(audio_checkpoint):
    for command in ("zeroshot", "retrieval", "knn"):
        for modality in ("image", "audio"):
            refused(["eval", command, "--checkpoint", str(audio_checkpoint), "--data", str(HELDOUT), "--modality",
                     modality, "--still-frame", "--device", "cpu", "--workers", "0"],
                    "--still-frame repeats a video clip's centre frame", "--modality video")
