"""FLIP in contrastive training: the tower, routing groups and capacity see only the kept patches;
the last `unmasked_steps` and evaluation see all of them; masks depend on the step alone."""

import re

import pytest
import torch

from limoe.config import load_config
from limoe.errors import LimoeError
from limoe.model.routing import expert_capacity
from limoe.model.tower import build_model
from limoe.training.objectives import ContrastiveObjective, CoTrainingObjective


def _trainer(*overrides: str) -> ContrastiveObjective:
    config = load_config("demo", ["train.steps=10", "train.image_mask_ratio=0.5", "train.unmasked_steps=3", *overrides])
    torch.manual_seed(0)
    return ContrastiveObjective(build_model(config), config)


def _batch():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (12, 16), generator=generator)
    tokens[:, 9:] = 0
    return torch.randn(12, 3, 64, 64, generator=generator), tokens


def test_masked_steps_route_only_the_kept_patches_with_capacity_from_them():
    trainer = _trainer()
    images, tokens = _batch()
    _, _, routing = trainer(images, tokens, step=0)
    # 12 examples in groups of 8 → 2 groups of 6; per example 32 kept patches + 16 text positions.
    assert routing[0].expert.shape == (12, 32 + 16)
    assert routing[0].capacity == expert_capacity(6 * 48, 4, 1.05)
    assert int(routing[0].routed[0].sum()) == 12 * 32  # image tokens routed
    assert trainer.stage(0) == trainer.stage(6) == "masked"


def test_the_last_unmasked_steps_and_evaluation_see_every_patch():
    trainer = _trainer()
    images, tokens = _batch()
    _, _, routing = trainer(images, tokens, step=7)
    assert routing[0].expert.shape == (12, 64 + 16) and trainer.stage(7) == "unmasked"
    trainer.eval()
    with torch.no_grad():
        _, _, routing = trainer(images, tokens, step=0)
    assert routing[0].expert.shape == (12, 64 + 16)
    assert _trainer("train.image_mask_ratio=0.0").stage(0) is None


def test_masks_are_a_function_of_the_step():
    trainer = _trainer()
    images, _ = _batch()
    keep = trainer.patch_keep(images, 4)
    assert keep.shape == (12, 32) and torch.equal(keep, trainer.patch_keep(images, 4))
    assert not torch.equal(keep, trainer.patch_keep(images, 5))


@pytest.mark.parametrize("override, message", [
    ("train.image_mask_ratio=1.0", "'train.image_mask_ratio' is 1.0; it must be a number in [0, 1)"),
    ("train.unmasked_steps=11", "train.unmasked_steps 11 is more than train.steps 10"),
    ("train.audio_mask_ratio=0.5", "train.audio_mask_ratio is 0.5 but model.modalities ['image', 'text'] has no "
                                   "audio to mask; add audio or drop it."),
])
def test_bad_masking_settings_are_clear_errors(override, message):
    with pytest.raises(LimoeError, match=re.escape(message)):
        load_config("demo", ["train.steps=10", override])


# ---------------------------------------------------------------------------------------------
# Audio clips: train.audio_mask_ratio drops spectrogram patches as images drop theirs

AUDIO_TEXT = ("audio", "text")


def _audio_trainer(*overrides: str) -> tuple[ContrastiveObjective, int]:
    """The audio demo's objective (image, text, audio; 1 s clips of 48 spectrogram patches, no class
    token; a 300-step run) whose last 3 steps are unmasked; and the audio tokens' modality id."""
    config = load_config("audio-demo", ["train.unmasked_steps=3", *overrides])
    assert config.train.steps == 300
    assert config.model.audio.num_patches == 48 and config.model.audio.pool == "map"
    torch.manual_seed(0)
    return ContrastiveObjective(build_model(config), config), config.model.modality_id("audio")


def _clips() -> tuple[torch.Tensor, torch.Tensor]:
    """12 one-second clips [12, 16000] and their captions [12, 16] (9 tokens, then padding)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (12, 16), generator=generator)
    tokens[:, 9:] = 0
    return 0.3 * torch.randn(12, 16000, generator=generator), tokens


def _audio_tokens(routing, audio: int) -> int:
    """Audio tokens that reached the first MoE layer (all examples)."""
    return int(routing[0].routed[audio].sum())


@pytest.mark.parametrize("ratio, kept", [("0.5", 24), ("0.3", 34)])  # round(0.5·48) = 24, round(0.7·48) = 33.6 → 34
def test_an_audio_task_step_encodes_the_kept_share_of_each_clip(ratio, kept):
    trainer, audio = _audio_trainer(f"train.audio_mask_ratio={ratio}")
    clips, tokens = _clips()
    _, _, routing = trainer(clips, tokens, step=0, modalities=AUDIO_TEXT)
    assert routing[0].expert.shape == (12, kept + 16)  # every clip: `kept` patches, then its 16 text positions
    assert _audio_tokens(routing, audio) == 12 * kept
    keep = trainer.patch_keep(clips, 0, "audio")  # [12, kept]: a distinct subset per clip, each index once
    assert keep.shape == (12, kept) and len({tuple(row.tolist()) for row in keep}) == 12
    assert all(len(set(row.tolist())) == kept and 0 <= min(row) and max(row) < 48 for row in keep)
    assert trainer.stage(0) == "masked"


def test_a_clip_classification_step_drops_the_clips_patches_not_the_prompts_tokens():
    config = load_config("audio-demo", ["train.unmasked_steps=3", "train.audio_mask_ratio=0.5"])
    torch.manual_seed(0)
    trainer = CoTrainingObjective(build_model(config), config)
    clips, prompts = _clips()  # 12 clips; 12 prompts: 4 classes × 3 templates
    _, terms, (clip_routing, prompt_routing) = trainer(clips, torch.arange(12) % 4, step=0, prompts=prompts,
                                                       templates=3, modalities=AUDIO_TEXT)
    assert _audio_tokens(clip_routing, config.model.modality_id("audio")) == 12 * 24
    assert int(prompt_routing[0].routed.sum()) == 12 * 9  # every prompt token, unmasked
    assert terms["candidates"] == 4


def test_the_unmasked_phase_and_evaluation_encode_every_patch_of_a_clip():
    trainer, audio = _audio_trainer("train.audio_mask_ratio=0.5")
    clips, tokens = _clips()
    _, _, routing = trainer(clips, tokens, step=297, modalities=AUDIO_TEXT)
    assert _audio_tokens(routing, audio) == 12 * 48 and trainer.stage(297) == "unmasked"
    _, _, routing = trainer(clips, tokens, step=296, modalities=AUDIO_TEXT)  # the last masked step
    assert _audio_tokens(routing, audio) == 12 * 24
    trainer.eval()
    with torch.no_grad():
        _, _, routing = trainer(clips, tokens, step=0, modalities=AUDIO_TEXT)
    assert _audio_tokens(routing, audio) == 12 * 48


def test_the_image_ratio_does_not_mask_clips_and_the_audio_ratio_does_not_mask_images():
    images, image_tokens = _batch()
    clips, tokens = _clips()
    trainer, audio = _audio_trainer("train.image_mask_ratio=0.5")
    _, _, routing = trainer(clips, tokens, step=0, modalities=AUDIO_TEXT)
    assert _audio_tokens(routing, audio) == 12 * 48
    trainer, _ = _audio_trainer("train.audio_mask_ratio=0.5")
    _, _, routing = trainer(images, image_tokens, step=0)
    assert routing[0].expert.shape == (12, 64 + 16)
    trainer, audio = _audio_trainer("train.image_mask_ratio=0.75", "train.audio_mask_ratio=0.5")
    _, _, routing = trainer(clips, tokens, step=0, modalities=AUDIO_TEXT)
    assert _audio_tokens(routing, audio) == 12 * 24  # each modality its own ratio
    _, _, routing = trainer(images, image_tokens, step=0)
    assert routing[0].expert.shape == (12, 16 + 16)
