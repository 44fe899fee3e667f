"""Files written before the modality registry name the tower's per-modality tensors as attributes
of the tower (`patch_embed.weight`, `cls_token`, `text_proj.weight`): they load unchanged.

`fixtures/before_modality_registry.safetensors` is a model file (seed 0, limoe-tiny shrunk to
width 8, cls image pooling, map text pooling, one MoE block) written by limoe before the registry,
and `…features.safetensors` the features that code computed from it for `_inputs()`."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from limoe.checkpoints.legacy import modality_registry_name
from limoe.checkpoints.loading import load_model
from limoe.model.tower import build_model

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_FILE = FIXTURES / "before_modality_registry.safetensors"


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.linspace(-1, 1, 3 * 3 * 8 * 8).reshape(3, 3, 8, 8)
    tokens = torch.tensor([[1, 5, 9, 15, 0], [2, 3, 0, 0, 0], [14, 13, 12, 11, 10]])
    return images, tokens


def test_a_model_file_from_before_the_registry_loads_and_gives_the_features_it_gave_then():
    with safe_open(str(MODEL_FILE), framework="pt") as handle:
        assert {"patch_embed.weight", "cls_token", "text_pool.map.probe", "image_proj.weight"} <= set(handle.keys())
    model, config = load_model(MODEL_FILE)
    with torch.no_grad():
        image, text, _ = model(*_inputs())
    expected = load_file(str(FIXTURES / "before_modality_registry.features.safetensors"))
    assert torch.equal(image, expected["image_features"]) and torch.equal(text, expected["text_features"])
    torch.manual_seed(0)  # the seed the file was written with: today's build draws the same weights
    rebuilt = build_model(config).state_dict()
    loaded = model.state_dict()
    assert list(loaded) == list(rebuilt)
    assert all(torch.equal(loaded[name], rebuilt[name]) for name in rebuilt)


@pytest.mark.parametrize("stored, today", [
    ("patch_embed.weight", "embedders.image.patch_embed.weight"),
    ("cls_token", "image_cls_token"),
    ("token_embed.weight", "embedders.text.token_embed.weight"),
    ("image_pool.map.attention.in_proj_weight", "pools.image.map.attention.in_proj_weight"),
    ("text_proj.weight", "projections.text.weight"),
    ("model.text_pool.map.probe", "model.pools.text.map.probe"),  # a training checkpoint's model entries
    ("exp_avg_sq/model.patch_embed.bias", "exp_avg_sq/model.embedders.image.patch_embed.bias"),  # its Adam moments
    ("image_positions", "image_positions"),  # names that were never changed
    ("model.text_positions", "model.text_positions"),
    ("blocks.0.image.norm1.weight", "blocks.0.image.norm1.weight"),
    ("model.image_decoder.positions", "model.image_decoder.positions"),
    ("embedders.image.patch_embed.weight", "embedders.image.patch_embed.weight"),  # already today's
    ("pools.text.map.probe", "pools.text.map.probe"),
])
def test_names_from_before_the_registry_are_read_as_todays(stored, today):
    assert modality_registry_name(stored) == today
