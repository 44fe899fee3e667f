"""`limoe routing --modality video` on the shipped held-out sprite filmstrips, checked against the
routing worked out here (`by_hand`): every clip's frames cut straight from its filmstrip, made
the model's input with `limoe.preprocess_video` and encoded with its caption in one forward.
Dropless capacity makes each token's expert independent of its batch-mates, so the command's
batches of an odd size (23) route as the one batch of the reference does."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import limoe
from limoe.checkpoints import load_model
from limoe.data.preprocess import unnormalize
from limoe.data.video import decode_frames
from limoe.routing_report.command import _pictures
from limoe.routing_report.pictures import LEGEND_PX
from tests.evaluate.by_hand import shard_members
from tests.helpers import VIDEO_HELDOUT as HELDOUT, refused, run_limoe
from tests.routing_report.by_hand import assert_counts_as_routed_by_hand, route_by_hand

CLIPS, BATCH = 192, 23
STEPS, SIDE = 3, 3  # the video checkpoint's tubelet steps and grid side: 27 tokens a clip


@pytest.fixture(scope="module")
def routed(video_checkpoint, tmp_path_factory):
    """The report's JSON and folder, and the routing by hand of all 192 clips with their captions."""
    output = tmp_path_factory.mktemp("routing")
    run_limoe(["routing", "--checkpoint", str(video_checkpoint), "--data", str(HELDOUT), "--modality", "video",
               "--output", str(output), "--device", "cpu", "--workers", "0", "--batch-size", str(BATCH),
               "--num-batches", str(-(-CLIPS // BATCH)), "--capacity-factor", "dropless"])
    model, config = load_model(video_checkpoint, capacity_factor="dropless")
    model.eval()
    samples = shard_members(HELDOUT)
    video = config.model.video
    clips = torch.stack([limoe.preprocess_video(decode_frames(s["png"], video.frames, video.frame_stride, "centre"),
                                                model) for s in samples.values()])  # [192, 6, 3, 24, 24]
    by_hand = route_by_hand(model, "video", clips, [json.loads(s["json"])["text"][0] for s in samples.values()])
    return {"report": json.loads((output / "routing.json").read_text()), "output": output, **by_hand,
            "clips": clips, "keys": [name.split("/", 1)[1] for name in samples], "model": model}


def test_video_and_text_counts_are_the_tokens_routed_to_each_expert(routed):
    assert_counts_as_routed_by_hand(routed["report"], routed, routed["model"], "video", CLIPS * STEPS * SIDE * SIDE)


def test_clip_pictures_are_one_expert_grid_per_tubelet_step_of_the_pictured_block(routed):
    checkpoint = routed["report"]["checkpoints"][0]
    video_id = routed["model"].config.modalities.index("video")
    experts = routed["experts"][-1]  # the last MoE block, pictured by default
    assert checkpoint["pictured_block"] == routed["model"].config.moe_layers[-1]
    assert [example["key"] for example in checkpoint["examples"]] == routed["keys"][:4]
    for index, example in enumerate(checkpoint["examples"]):
        tubelets = experts[index][routed["ids"][index] == video_id]  # [27], time-major
        # token s·9 + 3·r + c is the tubelet of step s at row r, column c of the grid
        by_step = [[[int(tubelets[step * 9 + 3 * row + column]) for column in range(SIDE)] for row in range(SIDE)]
                   for step in range(STEPS)]
        assert example["patch_experts"] == by_step
        assert np.array(example["patch_kept"]).shape == (STEPS, SIDE, SIDE) and np.array(example["patch_kept"]).all()
    with Image.open(routed["output"] / "patch_experts.png") as picture:
        assert picture.size == (2 * 240, 4 * 260 + LEGEND_PX)  # a filmstrip and a map per clip


def test_the_filmstrip_pictured_is_each_tubelet_step_s_first_frame(routed):
    """The command's picture of a clip, from its recorded pixels: frames 0, 2 and 4 side by side."""
    clip = routed["clips"][:1]  # [1, 6, 3, 24, 24]
    strip = _pictures(routed["model"], "video", clip)[0]  # [24, 72, 3]
    assert strip.shape == (24, 72, 3)
    for step in range(STEPS):
        frame = unnormalize(clip[:, 2 * step])[0].permute(1, 2, 0).numpy()  # [24, 24, 3]
        np.testing.assert_array_equal(strip[:, 24 * step : 24 * (step + 1)], frame)


def test_a_model_without_video_asked_for_video_is_one_line_and_exit_2(audio_checkpoint, tmp_path):
    refused(["routing", "--checkpoint", str(audio_checkpoint), "--data", str(HELDOUT), "--modality", "video",
             "--output", str(tmp_path / "out"), "--device", "cpu", "--workers", "0"],
            "embeds image, text, audio, not video")
    assert not (tmp_path / "out").exists()
