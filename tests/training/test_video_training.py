"""Video clips through `limoe train`: their loaders, co-training tasks of [video, text] and FLIP's tube
masking, against hand computations on the video demo's model
(configs/train/video-demo.yaml: 32 px frames in 8 px patches, 8 frames), here in tubelets of 4 frames:
2 steps of 16 positions, 32 tokens a clip."""

import re

import pytest
import torch

from limoe.config import ShardSource, load_config
from limoe.data.pipeline import loader_options
from limoe.errors import LimoeError
from limoe.model.masking import tube_keep
from limoe.model.tower import build_model
from limoe.training.cotraining import check_tasks
from limoe.training.loaders import train_loader_for
from limoe.training.objectives import CoTrainingObjective

VIDEO_TEXT = ("video", "text")
CLIPS_TASK = "{name: clips, kind: contrastive, data: data_shards/video_train, modalities: [video, text], " \
             "batch_size: 16, steps: 5}"


def _demo(*overrides: str):
    return load_config("video-demo", ["data.workers=0", "model.video.tubelet_frames=4", *overrides])


def test_video_loaders_read_the_models_frames_and_stride():
    config = _demo("model.video.frame_stride=2", "model.video.frames=4")
    assert loader_options(config.model, "video") == {"modality": "video", "frames": 4, "frame_stride": 2}
    loader = train_loader_for(config, (ShardSource("data_shards/video_train"),), 6, 1, torch.device("cpu"), 0,
                              modality="video")
    clips, tokens = next(iter(loader))
    assert clips.shape == (6, 4, 3, 32, 32) and clips.dtype == torch.uint8  # 4 frames of 32 px, as the model reads
    assert tokens.shape == (6, 16)


def test_a_video_task_and_a_video_classification_task_are_accepted_and_video_with_images_is_not():
    classify = ("{name: directions, kind: classification, data: data_shards/video_heldout, "
                "modalities: [video, text], batch_size: 16, steps: 5}")
    check_tasks(_demo(f"tasks=[{CLIPS_TASK}, {classify}]", "train.steps=10"), 1)
    wrong = "{name: clips, kind: contrastive, data: data_shards/video_train, modalities: [video, image], steps: 5}"
    with pytest.raises(LimoeError, match=re.escape("tasks[].modalities ['video', 'image'] cannot be trained; a task "
                                                   "pairs image, audio or video with text")):
        check_tasks(_demo(f"tasks=[{wrong}]", "train.steps=5"), 1)


def test_tubes_keep_the_same_positions_in_every_step():
    keep = torch.tensor([[0, 2], [1, 3]])  # 2 of 4 grid positions per clip
    assert tube_keep(keep, 3, 4).tolist() == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]


def _clips(count: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` uint8 clips [count, 8, 3, 32, 32] and captions [count, 16] (9 tokens, then padding)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (count, 16), generator=generator)
    tokens[:, 9:] = 0
    return torch.randint(0, 256, (count, 8, 3, 32, 32), generator=generator, dtype=torch.uint8), tokens


def _objective(*overrides: str) -> tuple[CoTrainingObjective, int]:
    config = _demo("train.unmasked_steps=3", *overrides)
    torch.manual_seed(0)
    return CoTrainingObjective(build_model(config), config), config.model.modality_id("video")


@pytest.mark.parametrize("ratio, kept", [("0.5", 8), ("0.7", 5)])  # round(16·0.5) = 8; round(16·0.3) = 4.8 → 5
def test_video_flip_drops_tubes_the_same_positions_in_both_tubelet_steps(ratio, kept):
    trainer, video = _objective(f"train.video_mask_ratio={ratio}")
    clips, tokens = _clips()
    _, _, routing = trainer(clips, tokens, step=0, modalities=VIDEO_TEXT)
    assert routing[0].expert.shape == (7, 2 * kept + 16)  # each clip: kept positions x 2 steps, then 16 text
    assert int(routing[0].routed[video].sum()) == 7 * 2 * kept
    keep = trainer.patch_keep(clips, 0, "video")  # [7, 2·kept]
    assert keep.shape == (7, 2 * kept) and bool((keep[:, kept:] == keep[:, :kept] + 16).all())
    assert all(len(set(row.tolist())) == 2 * kept and max(row) < 32 for row in keep)
    assert len({tuple(row.tolist()) for row in keep}) == 7  # each clip its own positions


def test_the_video_ratio_masks_only_clips_and_not_in_the_unmasked_phase():
    trainer, video = _objective("train.video_mask_ratio=0.5")
    clips, tokens = _clips()
    _, _, routing = trainer(clips, tokens, step=297, modalities=VIDEO_TEXT)  # 300 steps, the last 3 unmasked
    assert int(routing[0].routed[video].sum()) == 7 * 32 and trainer.stage(297) == "unmasked"
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    _, _, routing = trainer(images, tokens, step=0)
    assert routing[0].expert.shape == (7, 16 + 16)  # images keep their 16 patches
    with pytest.raises(LimoeError, match=re.escape("train.video_mask_ratio is 0.5 but model.modalities ['image', "
                                                   "'text'] has no video to mask; add video or drop it.")):
        load_config("demo", ["train.video_mask_ratio=0.5"])


def test_a_video_classification_step_scores_clips_against_the_class_prompts():
    trainer, video = _objective("train.video_mask_ratio=0.5")
    clips, prompts = _clips(8)  # 8 prompts: 4 classes × 2 templates
    _, terms, (clip_routing, prompt_routing) = trainer(clips, torch.arange(8) % 4, step=0, prompts=prompts,
                                                       templates=2, modalities=VIDEO_TEXT)
    assert int(clip_routing[0].routed[video].sum()) == 8 * 16  # 8 positions x 2 steps a clip
    assert int(prompt_routing[0].routed.sum()) == 8 * 9
    assert terms["candidates"] == 4 and torch.isfinite(terms["loss"])
