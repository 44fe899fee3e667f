"""Config parsing: strict keys and types with dotted paths, overrides, layer helpers."""

import pytest

from limoe.config import (
    Config,
    ShardSource,
    every_n_layers,
    from_dict,
    last_n_layers,
    load_config,
    load_model_config,
    to_dict,
)
from limoe.errors import LimoeError


def test_layer_helpers_follow_vmoe_placement():
    assert every_n_layers(12, 2) == (1, 3, 5, 7, 9, 11)
    assert last_n_layers(32, 12) == (9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
    with pytest.raises(LimoeError, match="last 7"):
        last_n_layers(12, 7)


def test_model_files_resolve_bases_and_layer_specs():
    b16 = load_model_config("limoe-b16")
    assert (b16.patch_size, b16.width, b16.depth) == (16, 768, 12)
    assert b16.moe.layers == (1, 3, 5, 7, 9, 11)
    assert load_model_config("limoe-h14").moe.num_experts == 32


def test_overrides_are_type_checked_and_dotted():
    config = load_config("demo", ["train.steps=7", "model.moe.layers=[1]", "optim.lr=1"])
    assert config.train.steps == 7 and config.model.moe.layers == (1,)
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    with pytest.raises(LimoeError, match="'train.steps' must be of type int"):
        load_config("demo", ["train.steps=many"])


def test_unknown_key_names_its_dotted_path_and_a_suggestion():
    with pytest.raises(LimoeError, match=r"unknown config key 'model\.moe\.num_expert' \(did you mean 'num_experts'"):
        load_config("demo", ["model.moe.num_expert=4"])


def test_exponent_notation_is_a_float_even_where_yaml_reads_a_string():
    assert load_config("demo", ["optim.lr=1e-3"]).optim.lr == 1e-3
    assert load_config("demo", ["optim.min_lr=2E5"]).optim.min_lr == 2e5
    with pytest.raises(LimoeError, match="'optim.lr' must be of type float"):
        load_config("demo", ["optim.lr=1e-3x"])


def test_wrong_type_and_bool_is_not_an_int():
    with pytest.raises(LimoeError, match="'model.depth' must be of type int"):
        from_dict(Config, {"model": {"depth": True}})
    with pytest.raises(LimoeError, match="one of"):
        from_dict(Config, {"model": {"image_pool": "max"}})


def test_moe_index_beyond_depth_is_an_error():
    with pytest.raises(LimoeError, match="beyond the model's depth 4"):
        load_config("demo", ["model.moe.layers=[1, 4]"])


def test_shard_source_shorthand_and_round_trip():
    config = load_config("demo", ["data.train=/data/{00000..00003}.tar"])
    assert config.data.train == (ShardSource("/data/{00000..00003}.tar", 1.0),)
    assert from_dict(Config, to_dict(config)) == config


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(LimoeError, match="does not exist"):
        load_config("no/such/file.yaml")
    with pytest.raises(LimoeError, match="no models config named 'limoe-xl'"):
        load_model_config("limoe-xl")


def test_pretraining_config_builds_on_the_training_demo():
    config = load_config(None, kind="pretrain")  # configs/pretrain/demo.yaml, whose base is configs/train/demo.yaml
    assert config.model.name == "limoe-tiny" and config.optim.warmup_steps == 30
    assert (config.pretrain.unimodal_steps, config.pretrain.bimodal_steps, config.train.steps) == (500, 100, 600)
    assert (config.pretrain.decoder_width, config.pretrain.image_mask_ratio, config.pretrain.text_mask_ratio) == (64, 0.75, 0.15)
    assert load_config("demo").pretrain.decoder_width == 512  # MAE's default where a config says nothing


@pytest.mark.parametrize("override, message", [
    ("pretrain.text_replace_with_random=0.3", "together at most 1"),
    ("pretrain.image_mask_ratio=1.0", "pretrain.image_mask_ratio 1.0 must be at least 0 and below 1"),
    ("pretrain.decoder_heads=5", "not divisible by pretrain.decoder_heads 5"),
])
def test_bad_pretraining_settings_are_clear_errors(override, message):
    with pytest.raises(LimoeError, match=message):
        load_config(None, [override], kind="pretrain")
