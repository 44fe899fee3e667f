"""FLIP in contrastive training: the tower, routing groups and capacity see only the kept patches;
the last `unmasked_steps` and evaluation see all of them; masks depend on the step alone."""

import re

import pytest
import torch

from limoe.config import load_config
from limoe.errors import LimoeError
from limoe.model.routing import expert_capacity
from limoe.model.tower import build_model
from limoe.training.objectives import ContrastiveObjective


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
    keep = trainer.patch_dropping.keep(images, 4)
    assert keep.shape == (12, 32) and torch.equal(keep, trainer.patch_dropping.keep(images, 4))
    assert not torch.equal(keep, trainer.patch_dropping.keep(images, 5))


@pytest.mark.parametrize("override, message", [
    ("train.image_mask_ratio=1.0", "'train.image_mask_ratio' is 1.0; it must be a number in [0, 1)"),
    ("train.unmasked_steps=11", "train.unmasked_steps 11 is more than train.steps 10"),
])
def test_bad_masking_settings_are_clear_errors(override, message):
    with pytest.raises(LimoeError, match=re.escape(message)):
        load_config("demo", ["train.steps=10", override])
