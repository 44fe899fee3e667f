"""The masked-pretraining objective: its schedule, what the losses see, padding, and that it learns
on a small fixed batch of real emoji (the held-out measurement is in test_learning.py, slow)."""

import pytest
import torch

from limoe.config import load_config
from limoe.data.pipeline import eval_loader
from limoe.data.preprocess import tokenizer
from limoe.model.masking import masked_patches, random_patch_keep, step_generator
from limoe.model.tower import Limoe
from limoe.modalities.patches import patchify
from limoe.pretraining.losses import masked_patch_loss, normalized_patches
from limoe.pretraining.objective import MaskedPretraining, stage_at, task_at

SMALL = ["pretrain.decoder_width=32", "pretrain.decoder_depth=1", "pretrain.decoder_heads=2",
         "pretrain.unimodal_steps=4", "pretrain.bimodal_steps=4", "train.steps=8"]


def _objective(*overrides: str, seed: int = 0) -> MaskedPretraining:
    config = load_config(None, [*SMALL, *overrides], kind="pretrain")
    torch.manual_seed(seed)
    return MaskedPretraining(Limoe(config.model, config.loss.logit_scale_init), config)


@pytest.fixture(scope="module")
def emoji():
    """32 held-out emoji and their captions, as the eval pipeline gives them."""
    return next(iter(eval_loader("data_shards/heldout", 32, 64, 16, workers=0)))


def test_the_schedule_is_a_pure_function_of_the_step():
    config = load_config(None, ["pretrain.unimodal_steps=3", "pretrain.bimodal_steps=4", "train.steps=7"],
                         kind="pretrain").pretrain
    names = [task_at(step, config).name for step in range(7)]
    assert names == ["masked_image", "masked_text", "masked_image",
                     "masked_text_given_image", "masked_image_given_text", "masked_text_given_image",
                     "masked_image_given_text"]
    assert [stage_at(step, config) for step in (0, 2, 3, 6)] == ["unimodal", "unimodal", "bimodal", "bimodal"]


def test_changing_visible_patches_targets_leaves_the_masked_image_loss_unchanged(emoji):
    images = emoji.images
    keep = random_patch_keep(len(images), 64, 0.75, step_generator(0, 0, "test", torch.device("cpu")))
    hidden = masked_patches(keep, 64)
    prediction = torch.randn(len(images), 64, 8 * 8 * 3)
    loss = masked_patch_loss(prediction, normalized_patches(patchify(images, 8)), hidden)
    patches = patchify(images, 8)
    visible_changed = torch.where(hidden[..., None], patches, torch.randn_like(patches))
    assert masked_patch_loss(prediction, normalized_patches(visible_changed), hidden) == loss
    hidden_changed = torch.where(hidden[..., None], torch.randn_like(patches), patches)
    assert masked_patch_loss(prediction, normalized_patches(hidden_changed), hidden) != loss


def test_the_encoder_sees_only_the_visible_patches(emoji):
    """MAE: the tower encodes the visible patches alone, so the hidden ones' pixels change
    the targets but not the prediction."""
    objective = _objective().eval()
    with torch.no_grad():
        first, _ = objective.predict_patches(emoji.images, None, step=0)
        changed = emoji.images.clone()
        hidden = first.hidden.view(-1, 8, 8).repeat_interleave(8, 1).repeat_interleave(8, 2)  # [B, 64, 64] pixels
        changed[hidden[:, None].expand_as(changed)] = 5.0
        second, routing = objective.predict_patches(changed, None, step=0)
    assert routing[0].expert.shape == (32, 16)  # 64 patches, 75% hidden: 16 routed per image
    torch.testing.assert_close(second.prediction, first.prediction)
    assert not torch.equal(second.target, first.target)


@pytest.mark.parametrize("step", [1, 5])  # masked text; masked text given the image
def test_padding_is_never_masked_nor_routed(emoji, step):
    objective = _objective("model.moe.eval_capacity_factor=null").eval()
    tokens = emoji.tokens
    padding = tokens == 0
    assert padding.any()
    with torch.no_grad():
        out, routing = objective.predict_text(tokens, emoji.images if step == 5 else None, step)
    assert out.targets.numel() > 0 and (out.targets != 0).all()
    text_experts = [r.expert[:, -tokens.shape[1]:] for r in routing]  # the text tokens come last
    for experts in text_experts:
        assert (experts[padding] == -1).all() and (experts[~padding] >= 0).all()


@pytest.fixture
def one_thread():
    """Two intra-op threads on a busy 2-core machine run many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_objective_learns_on_a_fixed_batch(emoji, one_thread):
    """Smoke check of the whole objective: 60 AdamW steps on one batch bring the masked-patch
    error well below predicting zero and the masked-token accuracy above the best constant answer."""
    objective = _objective(seed=1)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    for step in range(60):
        loss, _, _ = objective(emoji.images, emoji.tokens, step % 2)  # unimodal: image, then text
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    objective.eval()
    with torch.no_grad():
        image, _ = objective.predict_patches(emoji.images, None, step=0)
        text, _ = objective.predict_text(emoji.tokens, None, step=1)
    error = masked_patch_loss(image.prediction, image.target, image.hidden)
    zero = masked_patch_loss(torch.zeros_like(image.target), image.target, image.hidden)
    assert error < 0.85 * zero
    accuracy = (text.logits.argmax(-1) == text.targets).float().mean()
    assert accuracy > torch.bincount(text.targets).max() / text.targets.numel()


def test_markers_are_the_ids_from_the_start_of_text_marker_on():
    """Ids from the start-of-text marker on are markers, never masked nor drawn as replacements."""
    assert tokenizer(16).sot_token_id == _objective().first_special_id
