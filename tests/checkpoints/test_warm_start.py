"""train.init_from: weights into a fresh model, experts by global index, strict one-line errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from limoe.checkpoints.model_file import CONFIG_KEY, save_model_file
from limoe.checkpoints.warm_start import warm_start
from limoe.config import load_config, to_dict
from limoe.distributed import ExpertSharding
from limoe.errors import LimoeError
from limoe.model.tower import Limoe

CONFIG = load_config("demo")


def _model(seed: int, sharding: ExpertSharding = ExpertSharding(), config=CONFIG) -> Limoe:
    torch.manual_seed(seed)
    return Limoe(config.model, sharding=sharding)


def _write(state: dict, path, config=CONFIG):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={CONFIG_KEY: json.dumps(to_dict(config))})
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "model.safetensors"
    save_model_file(_model(0), CONFIG, path)
    return path


def test_a_fresh_model_gets_every_weight_of_the_file(source):
    original, model = _model(0).state_dict(), _model(1)
    assert not torch.equal(model.image_positions, original["image_positions"])
    result = warm_start(model, source)
    assert result.loaded == len(original) and result.dropped == ()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_each_expert_parallel_rank_takes_its_own_experts_by_global_index(source):
    original = _model(0).state_dict()
    model = _model(1, ExpertSharding(size=2, rank=1))  # experts 2 and 3 of 4 live here as local 0 and 1
    warm_start(model, source)
    state = model.state_dict()
    prefix = "blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts"
    assert f"{prefix}.2.fc1.weight" not in state
    for local, index in ((0, 2), (1, 3)):
        assert torch.equal(state[f"{prefix}.{local}.fc1.weight"], original[f"{prefix}.{index}.fc1.weight"])
    assert torch.equal(state["token_embed.weight"], original["token_embed.weight"])


def test_known_training_only_heads_are_left_out_and_listed(tmp_path):
    state = {**_model(0).state_dict(), "image_decoder.predict.weight": torch.zeros(3, 2), "mask_embedding": torch.zeros(2)}
    result = warm_start(_model(1), _write(state, tmp_path / "with_heads.safetensors"))
    assert result.dropped == ("image_decoder.predict.weight", "mask_embedding")


@pytest.mark.parametrize("change, message", [
    ("missing", "has no tensor image_positions"),
    ("shape", "tensor text_positions has shape (8, 128)"),
    ("unknown", "holds tensor classifier.weight, which is neither"),
    ("architecture", "has no tensor blocks.3.norm1.weight"),
])
def test_a_source_that_does_not_fit_is_one_line_naming_the_tensor(tmp_path, change, message):
    state = _model(0).state_dict()
    if change == "missing":
        del state["image_positions"]
    elif change == "shape":
        state["text_positions"] = state["text_positions"][:8]
    elif change == "unknown":
        state["classifier.weight"] = torch.zeros(2, 2)
    else:  # a 3-block model's file into the 4-block demo model
        small = load_config("demo", ["model.depth=3", "model.moe.layers=[1]"])
        state = _model(0, config=small).state_dict()
    with pytest.raises(LimoeError) as error:
        warm_start(_model(1), _write(state, tmp_path / "bad.safetensors"))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(LimoeError, match="does not exist"):
        warm_start(_model(1), tmp_path / "nothing.safetensors")
