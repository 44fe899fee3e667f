"""open_clip's entry points: the same model from a config name, an exported file, a model folder
and `hf-hub:` from a local Hugging Face cache (offline); the temperature and SigLIP bias survive."""

import json

import pytest
import torch
from PIL import Image

import limoe
from limoe.checkpoints import save_model_file
from limoe.checkpoints.hub import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, save_model_folder
from limoe.config import Config, load_config, load_model_config
from limoe.errors import LimoeError
from limoe.model.tower import build_model


def _features(model, preprocess, tokenizer):
    images = torch.stack([preprocess(Image.new("RGB", (90, 45), colour)) for colour in ("red", "navy")])
    tokens = tokenizer(["a red heart", "a blue whale"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_a_name_a_file_a_folder_and_the_hub_give_the_same_model(tmp_path, offline_hub):
    cache, publish = offline_hub
    torch.manual_seed(0)
    model, preprocess_train, preprocess_val = limoe.create_model_and_transforms("limoe-tiny", capacity_factor="dropless")
    assert not model.training and "limoe-tiny" in limoe.list_models()
    assert preprocess_train(Image.new("RGB", (90, 70))).shape == preprocess_val(Image.new("RGB", (90, 70))).shape == (3, 64, 64)
    config = Config(model=load_model_config("limoe-tiny", ["moe.eval_capacity_factor=null"]))
    save_model_file(model, config, tmp_path / "tiny.safetensors")
    save_model_folder(model, config, tmp_path / "folder", repo_id="org/tiny")
    assert "hf-hub:org/tiny" in (tmp_path / "folder" / CARD_FILE).read_text()
    publish(tmp_path / "folder", "org/tiny")
    expected = _features(model, preprocess_val, limoe.get_tokenizer("limoe-tiny"))
    for name in (tmp_path / "tiny.safetensors", tmp_path / "folder", "hf-hub:org/tiny"):
        loaded, _, preprocess = limoe.create_model_and_transforms(str(name), cache_dir=cache)
        features = _features(loaded, preprocess, limoe.get_tokenizer(str(name), cache_dir=cache))
        for ours, theirs in zip(features, expected):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_tokenizer_needs_only_the_config_and_missing_files_are_one_line(tmp_path, offline_hub):
    cache, publish = offline_hub
    config = Config(model=load_model_config("limoe-tiny", ["context_length=12"]))
    save_model_folder(limoe.create_model("limoe-tiny"), config, tmp_path / "folder")
    publish(tmp_path / "folder", "org/config-only", files=(CONFIG_FILE,))
    assert limoe.get_tokenizer("hf-hub:org/config-only", cache_dir=cache)(["a cat"]).shape == (1, 12)
    with pytest.raises(LimoeError, match="cannot fetch limoe_config.json, model.safetensors of hf-hub:org/config-only"):
        limoe.create_model("hf-hub:org/config-only", cache_dir=cache)
    with pytest.raises(LimoeError, match="HF_HUB_OFFLINE=1"):
        limoe.create_model("hf-hub:org/never-downloaded", cache_dir=cache)


def test_siglip_bias_and_temperature_survive_the_model_folder(tmp_path):
    config = load_config("demo", ["loss.contrastive=siglip"])
    model = build_model(config)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
        model.logit_bias.fill_(-6.25)
    save_model_folder(model, config, tmp_path / "siglip")
    loaded = limoe.create_model(str(tmp_path / "siglip"))
    assert loaded.logit_scale.item() == 2.5 and loaded.logit_bias.item() == -6.25


def test_a_folder_whose_config_disagrees_with_its_weights_is_refused_naming_the_keys(tmp_path):
    """A hand-edited limoe_config.json: get_tokenizer would cut captions at 32 tokens for a model
    trained on 16; loading either way is one line naming every key that differs."""
    from tests.helpers import refused

    save_model_folder(limoe.create_model("limoe-tiny"), Config(model=load_model_config("limoe-tiny")), tmp_path / "f")
    edited = json.loads((tmp_path / "f" / CONFIG_FILE).read_text())
    edited["model"]["context_length"] = 32
    edited["train"]["seed"] = 7
    (tmp_path / "f" / CONFIG_FILE).write_text(json.dumps(edited))
    expected = f"model folder {tmp_path / 'f'}: {CONFIG_FILE} disagrees with the config embedded in {WEIGHTS_FILE} " \
               f"on model.context_length, train.seed (model.context_length 32 vs 16)"
    for load in (limoe.get_tokenizer, limoe.create_model):
        with pytest.raises(LimoeError) as error:
            load(str(tmp_path / "f"))
        assert str(error.value).startswith(expected)
    line = refused(["eval", "retrieval", "--checkpoint", str(tmp_path / "f"), "--data", "unused", "--device",
                            "cpu"])
    assert line.startswith(f"limoe: error: {expected}")
