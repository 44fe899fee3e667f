"""The modality registry: ids are positions in it, every per-modality table follows it, and the
tower builds one embedder, pooling head and projection per registered modality."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from limoe import config as config_module
from limoe.config import PerModality, load_model_config
from limoe.modalities import MODALITIES, NUM_MODALITIES, PADDING, modality, registered
from limoe.model.tower import Limoe


def test_a_modality_id_is_its_place_in_the_registry_and_padding_is_minus_one():
    assert [m.id for m in registered()] == list(range(NUM_MODALITIES)) == [0, 1]
    assert [m.name for m in registered()] == list(MODALITIES) == ["image", "text"]
    assert PADDING == -1 and PADDING not in range(NUM_MODALITIES)


def test_the_config_reads_its_modalities_from_the_registry():
    assert config_module.MODALITIES is MODALITIES
    assert [f.name for f in dataclasses.fields(PerModality)] == list(MODALITIES)  # one number per modality


def test_an_unregistered_modality_is_named_with_the_registered_ones():
    with pytest.raises(KeyError, match="'audio' is not a registered modality; these are: image, text"):
        modality("audio")


def test_reading_the_names_loads_no_model_code():
    """The config imports the registry, so the registry's root must not pull in torch."""
    code = "import sys, limoe.modalities; print('torch' in sys.modules, 'limoe.modalities.image' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() \
        == ["False", "False"]


def test_the_tower_has_one_embedder_pool_and_projection_per_modality_in_registry_order():
    config = load_model_config("limoe-tiny", ["image_pool=cls", "text_pool=eos"])
    with torch.device("meta"):
        model = Limoe(config)
    assert list(model.embedders) == list(model.pools) == list(model.projections) == list(MODALITIES)
    assert [model.pools[m].kind for m in MODALITIES] == ["cls", "eos"]
    # The tower holds each embedder's positions (and the class token) as its own parameters, ahead of
    # every submodule's: the parameter order the optimizer groups and the gradient norm's sum see.
    assert [name for name, _ in model.named_parameters()][:7] == [
        "image_positions", "image_cls_token", "text_positions", "logit_scale",
        "embedders.image.patch_embed.weight", "embedders.image.patch_embed.bias", "embedders.text.token_embed.weight"]


def test_each_dummy_batch_is_what_the_model_takes():
    config = load_model_config("limoe-tiny", ["image_size=16", "context_length=5"])
    images, tokens = (modality(m).dummy_batch(config, 3) for m in MODALITIES)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert tokens.shape == (3, 5) and tokens.dtype == torch.long and bool((tokens != 0).all())  # all real: all routed
