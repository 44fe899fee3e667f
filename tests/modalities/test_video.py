"""Video as the tower's fourth modality: the embedder's tokens against tubelets cut by hand (joint
and separable positions), kept tubelets and the class token, clips that do not fit, the frames'
preprocessing against the training path's uint8 normalisation, and bad settings (the widened
model, video beside text and model files are in test_registry.py, with audio's; the start from
an image model in tests/checkpoints/test_warm_start.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

import limoe
from limoe.config import load_config, load_model_config
from limoe.data.preprocess import eval_crop
from limoe.errors import LimoeError
from limoe.model.tower import Limoe
from limoe.training.objectives import normalized
from tests.helpers import refused, run_args

# 24 px frames in 8 px patches: a 3 × 3 grid; 6 frames in tubelets of 3: 2 steps, 18 tokens.
ODD = ["image_size=24", "modalities=[image, text, video]", "video.frames=6", "video.tubelet_frames=3"]


@pytest.mark.parametrize("positions", ["joint", "separable"])
def test_video_tokens_are_the_tubelets_time_major_with_their_positions(positions):
    torch.manual_seed(0)
    config = load_model_config("limoe-tiny", [*ODD, f"video.positions={positions}"])
    assert config.video_tokens == 18
    model = Limoe(config)
    clips = torch.randn(2, 6, 3, 24, 24)  # [B, T, 3, S, S]
    tokens = model.embed("video", clips)
    assert tokens.x.shape == (2, 18, config.width) and tokens.key_mask is None and tokens.name == "video"
    assert tokens.modality.tolist() == [[2] * 18] * 2  # video is this model's third modality
    # by hand: tubelet (τ, i, j) = frames 3τ.., rows 8i.., columns 8j..; token order τ, then i, then j
    kernel, bias = model.embedders["video"].patch_embed.weight, model.embedders["video"].patch_embed.bias  # [d, 3, 3, 8, 8]
    if positions == "joint":
        table = model.video_positions  # [18, d]
    else:  # a spatial table [9, d] plus a temporal one [2, d]
        assert model.video_positions.shape == (9, config.width) and model.video_temporal_positions.shape == (2, config.width)
        table = torch.stack([model.video_temporal_positions[step] + model.video_positions[cell]
                             for step in range(2) for cell in range(9)])
    expected = torch.stack([
        torch.einsum("btchw,dcthw->bd", clips[:, 3 * step: 3 * step + 3, :, 8 * i: 8 * i + 8, 8 * j: 8 * j + 8], kernel)
        + bias for step in range(2) for i in range(3) for j in range(3)], dim=1) + table  # [2, 18, d]
    torch.testing.assert_close(tokens.x, expected, atol=1e-4, rtol=1e-4)
    # a clip of one tubelet (3 frames) takes the first step's positions
    torch.testing.assert_close(model.embed("video", clips[:, :3]).x, tokens.x[:, :9])
    # gradients reach the convolution and the positions
    model.embed("video", clips).x.square().sum().backward()
    learned = [model.embedders["video"].patch_embed.weight, model.embedders["video"].patch_embed.bias,
               model.video_positions] + ([model.video_temporal_positions] if positions == "separable" else [])
    for parameter in learned:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_kept_tubelets_and_the_class_token_work_as_for_images():
    torch.manual_seed(0)
    model = Limoe(load_model_config("limoe-tiny", [*ODD, "video.pool=cls"]))
    clips = torch.randn(2, 6, 3, 24, 24)
    every = model.embed("video", clips).x  # [2, 1 + 18, d]
    keep = torch.tensor([[17, 0, 9], [4, 13, 5]])
    kept = model.embed("video", clips, keep=keep).x  # [2, 1 + 3, d]
    assert torch.equal(kept[:, 0], model.video_cls_token[0].expand(2, -1))
    assert torch.equal(kept[:, 1:], torch.stack([every[0, 1:][[17, 0, 9]], every[1, 1:][[4, 13, 5]]]))


@pytest.mark.parametrize("shape", [(1, 4, 3, 24, 24), (1, 9, 3, 24, 24), (1, 0, 3, 24, 24), (1, 6, 3, 32, 32)],
                         ids=["not whole tubelets", "longer than the positions", "no frames", "another size"])
def test_a_clip_that_does_not_fit_is_one_line(shape):
    model = Limoe(load_model_config("limoe-tiny", ODD))
    with pytest.raises(LimoeError, match=f"a clip of {shape[1]} frames of {shape[3]}×{shape[4]} pixels does not fit "
                                         "this model; it reads up to model.video.frames 6 frames, a multiple of "
                                         "model.video.tubelet_frames 3, of model.image_size 24×24 pixels"):
        model.encode_video(torch.randn(shape))


def test_preprocess_video_is_the_image_eval_transform_of_each_frame_as_the_training_step_normalises_uint8():
    """limoe.preprocess_video (PIL frames → floats) against the training path: the eval crop as uint8,
    normalised on the device by the objective (`normalized`), frame by frame."""
    model = Limoe(load_model_config("limoe-tiny", ODD))
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)) for _ in range(3)]
    clip = limoe.preprocess_video(frames, model)  # [3, 3, 24, 24]
    crops = torch.stack([torch.from_numpy(np.array(eval_crop(24)(frame))).permute(2, 0, 1) for frame in frames])
    assert crops.dtype == torch.uint8 and crops.shape == (3, 3, 24, 24)
    torch.testing.assert_close(clip, normalized({"video": crops[None]})["video"][0], atol=1e-6, rtol=0)
    assert model.encode_video(clip[None]).shape == (1, model.config.embed_dim)
    with pytest.raises(LimoeError, match="preprocess_video was given no frames"):
        limoe.preprocess_video([], model)


@pytest.mark.parametrize("overrides, message", [
    (["model.video.frames=7"], "model.video.frames 7 is not a multiple of model.video.tubelet_frames 2"),
    (["model.video.positions=axial"], "model.video.positions"),
    (["train.init_video_from_image=true", "model.modalities=[image, text, video]"],
     "train.init_video_from_image starts the video tensors of a model with image and video from train.init_from's"),
])
def test_bad_video_settings_are_one_line_and_exit_2(tmp_path, overrides, message):
    refused(run_args("train", tmp_path / "run", *overrides, "data.workers=0"), message)
    assert not (tmp_path / "run").exists()


def test_video_pooling_unlike_the_image_s_is_refused_with_init_video_from_image(tmp_path):
    with pytest.raises(LimoeError, match="model.video.pool is cls and model.image_pool map; make them equal"):
        load_config("demo", ["model.modalities=[image, text, video]", "model.video.pool=cls",
                             f"train.init_from={tmp_path}", "train.init_video_from_image=true"])
