"""`limoe pretrain` on video (VideoMAE): the tubelet targets against tubelets cut by hand, the tube
masks and the loss by hand, then a two-step run of the video pretraining config on the shipped
filmstrips end to end, its model exported as a Hugging Face folder, and the refusals."""

import json
from pathlib import Path

import pytest
import torch

import limoe
from limoe.checkpoints import load_model
from limoe.cli import main
from limoe.config import load_config, load_model_config
from limoe.data.pipeline import eval_loader, loader_options
from limoe.model.tower import Limoe
from limoe.pretraining.objective import MaskedPretraining, task_at
from tests.helpers import (QUICK_EVERY_STEP, TINY_DECODER, VIDEO_HELDOUT, metric_records, refused, run_args,
                           run_limoe)

CONFIG = "configs/pretrain/video-demo.yaml"
# The video demo's model: 8 frames of 32 px in tubelets of 2 × 8 × 8: 4 steps of a 4 × 4 grid, 64 tokens.
STEPS, GRID = 4, 16
SMALL = [*TINY_DECODER, "pretrain.unimodal_steps=1", "pretrain.bimodal_steps=1", "train.steps=2"]


def _objective(*overrides: str) -> MaskedPretraining:
    config = load_config(CONFIG, [*SMALL, *overrides], kind="pretrain")
    torch.manual_seed(0)
    return MaskedPretraining(Limoe(config.model, config.loss.logit_scale_init), config).eval()


def test_a_tubelet_s_values_are_its_frames_patches_cut_by_hand():
    """6 frames of 24 px in tubelets of 3 × 8 × 8: 2 steps of a 3 × 3 grid. Token 13 is step 1,
    row 1, column 1: frames 3–5, pixels 8–15 both ways, each frame's patch pixel by pixel (RGB
    last, as an image patch's), frame after frame; token 5 is step 0, row 1, column 2."""
    config = load_model_config("limoe-tiny", ["image_size=24", "modalities=[image, text, video]", "video.frames=6",
                                              "video.tubelet_frames=3"])
    embedder = Limoe(config).embedders["video"]
    clips = torch.randn(2, 6, 3, 24, 24)  # [B, T, 3, S, S]
    values = embedder.patch_values(clips)  # [2, 18, 3·8·8·3]
    assert values.shape == (2, 18, 576) == (2, config.video_tokens, embedder.patch_dim)

    def cut(clip, frames, rows, columns):
        return torch.cat([clip[f, :, rows, columns].permute(1, 2, 0).reshape(-1) for f in frames])

    assert torch.equal(values[1, 13], cut(clips[1], range(3, 6), slice(8, 16), slice(8, 16)))
    assert torch.equal(values[0, 5], cut(clips[0], range(0, 3), slice(8, 16), slice(16, 24)))


@pytest.fixture(scope="module")
def clips():
    """The first 7 held-out clips (an odd batch) and their captions, as the eval pipeline gives them."""
    model = load_config(CONFIG, kind="pretrain").model
    return next(iter(eval_loader(str(VIDEO_HELDOUT), 7, model.image_size, model.context_length, workers=0,
                                 **loader_options(model, "video"))))


@pytest.mark.parametrize("ratio, kept", [(None, 2), ("0.6", 6)])  # 16 × 0.1 = 1.6 → 2; 16 × 0.4 = 6.4 → 6
def test_masked_video_hides_the_same_grid_positions_at_every_tubelet_step(clips, ratio, kept):
    """VideoMAE's tube masking (default ratio 0.9): a clip keeps round(16·(1 − r)) grid positions,
    the same at each of its 4 steps, drawn per clip; only those tubelets are routed; the
    loss is the normalised-tubelet MSE over the hidden ones, computed here from the outputs."""
    objective = _objective(*([f"pretrain.video_mask_ratio={ratio}"] if ratio else []))
    assert objective.pretrain_config.video_mask_ratio == float(ratio or 0.9)
    assert task_at(0, objective.pretrain_config).name == "masked_video"
    with torch.no_grad():
        out, routing = objective.predict_patches(clips.images, None, step=0)
        loss = objective(clips.images, clips.tokens, step=0).terms["masked_video_loss"]
    by_step = out.hidden.view(7, STEPS, GRID)  # [B, steps, grid]
    assert (by_step == by_step[:, :1]).all()  # tubes: every step hides what the first does
    assert by_step[:, 0].sum(dim=1).tolist() == [GRID - kept] * 7
    assert len({tuple(row.tolist()) for row in by_step[:, 0]}) > 1  # drawn per clip (two of 7 may draw alike)
    assert routing[0].expert.shape == (7, STEPS * kept)
    errors = ((out.prediction - out.target) ** 2).mean(dim=-1)  # [7, 64]
    by_hand = sum(errors[clip, token].item() for clip in range(7) for token in range(STEPS * GRID)
                  if out.hidden[clip, token]) / (7 * STEPS * (GRID - kept))
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def _args(workdir: Path, *overrides: str) -> list[str]:
    return run_args("pretrain", workdir, *QUICK_EVERY_STEP, f"data.heldout={VIDEO_HELDOUT}", *SMALL, *overrides,
                    config=CONFIG)


def test_video_pretraining_runs_both_stages_on_clips_and_exports_a_video_model(tmp_path):
    """Two steps of 16 clips: masked video routes their 8 visible tubelets each; the bimodal step's
    masked text is given the whole clips (64 tubelets). The held-out report masks the 192 clips
    alike. `limoe export --format hf` of the run encodes clips as the run's own model file does."""
    workdir = tmp_path / "run"
    assert main(_args(workdir)) == 0
    records = metric_records(workdir)
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2]
    assert "masked_video_loss" in losses[0] and "masked_text_given_video_loss" in losses[1]
    routed = {r["stage"]: r["routing"]["layers"][0]["video"]["tokens"] for r in records if "routing" in r}
    assert routed == {"unimodal": 16 * STEPS * 2, "bimodal": 16 * STEPS * GRID}
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["masked_video"]["patches"] == final["masked_video_given_text"]["patches"] == 192 * STEPS * (GRID - 2)
    assert 0 < final["masked_video"]["zero_mse"] <= 1

    run_limoe(["export", "--workdir", str(workdir), "--output", str(tmp_path / "folder"), "--format", "hf"])
    original, _ = load_model(workdir / "model.safetensors")
    exported = limoe.create_model(str(tmp_path / "folder"))
    batch = next(iter(eval_loader(str(VIDEO_HELDOUT), 5, 32, 16, workers=0, **loader_options(exported.config,
                                                                                                "video"))))
    with torch.no_grad():
        assert torch.equal(exported.encode_video(batch.images), original.eval().encode_video(batch.images))


@pytest.mark.parametrize("config, overrides, message", [
    (None, ["pretrain.modalities=[video, text]"],
     "pretrain.modalities names 'video', which is not one of model.modalities (image, text)"),
    (CONFIG, ["pretrain.modalities=[text, video]"], "[image, text], [audio, text] or [video, text]"),
    (CONFIG, ["pretrain.video_mask_ratio=1.0"], "pretrain.video_mask_ratio"),
])
def test_video_pretraining_settings_that_cannot_run_are_one_line_and_exit_2(tmp_path, config, overrides, message):
    refused(run_args("pretrain", tmp_path, *QUICK_EVERY_STEP, *SMALL, *overrides, config=config), message)
    assert not (tmp_path / "checkpoints").exists()
