"""Checkpoints of older format versions read as today's: model files from before the experts were
stacked, a file without a recorded version taken as the oldest, one of a newer version refused in
one line, and the conversions applied in version order."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from limoe.checkpoints import legacy, load_model
from limoe.checkpoints.legacy import FORMAT_VERSION, OLDEST_VERSION, Conversion, current_model_state, current_name
from limoe.checkpoints.model_file import CONFIG_KEY, VERSION_KEY, save_model_file
from limoe.cli import main
from limoe.config import load_config, to_dict
from limoe.errors import LimoeError
from limoe.model.moe import EXPERT_PARAMETERS
from limoe.model.tower import build_model
from tests.checkpoints.test_expert_entries import moe_layer, per_expert_state

HELDOUT = str(Path(__file__).resolve().parents[2] / "data_shards" / "heldout")


def test_per_expert_names_of_old_files_load_into_the_stacked_layout():
    torch.manual_seed(8)
    moe = moe_layer(3, expert_init="independent")
    state = {"blocks.0.norm.weight": torch.ones(2), **per_expert_state(moe, "blocks.1.mlp.")}
    stacked = current_model_state(state, OLDEST_VERSION)
    assert set(stacked) == {"blocks.0.norm.weight", "blocks.1.mlp.router_weight",
                            *(f"blocks.1.mlp.{n}" for n in EXPERT_PARAMETERS)}
    for name, tensor in moe.state_dict().items():
        torch.testing.assert_close(stacked[f"blocks.1.mlp.{name}"], tensor)
    assert current_model_state(state, FORMAT_VERSION) == state  # today's files are read as they are
    del state["blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.fc2.bias"]
    with pytest.raises(LimoeError, match=r"fc2_bias: the checkpoint lacks expert\(s\) \[1\]"):
        current_model_state(state, OLDEST_VERSION)


def _old_file(model, config, path: Path, **metadata: str) -> Path:
    """`model` as a file written before the experts were stacked: per-expert names, no version."""
    sparse = tuple(f"blocks.{index}.mlp." for index, block in enumerate(model.blocks) if block.sparse)
    old = {name: tensor.clone() for name, tensor in model.state_dict().items() if not name.startswith(sparse)}
    for prefix in sparse:
        old.update(per_expert_state(model.get_submodule(prefix[:-1]), prefix))
    save_file(old, str(path), metadata={CONFIG_KEY: json.dumps(to_dict(config)), **metadata})
    return path


def test_an_exported_file_with_per_expert_names_loads_into_the_stacked_model(tmp_path):
    """A model file written before the experts were stacked (DeepSpeed's per-expert names, no
    format version) loads into the same weights."""
    config = load_config("demo")
    torch.manual_seed(10)
    model = build_model(config)
    path = _old_file(model, config, tmp_path / "old.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert any(".deepspeed_experts.3.fc2.bias" in name for name in handle.keys())
    loaded, _ = load_model(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_new_model_file_records_the_format_version_and_a_newer_one_is_refused_in_one_line(tmp_path, capsys):
    config = load_config("demo")
    model = build_model(config)
    path = tmp_path / "model.safetensors"
    save_model_file(model, config, path)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()[VERSION_KEY] == str(FORMAT_VERSION)
    newer = _old_file(model, config, tmp_path / "newer.safetensors", **{VERSION_KEY: str(FORMAT_VERSION + 1)})
    assert main(["eval", "retrieval", "--checkpoint", str(newer), "--data", HELDOUT, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"format version '{FORMAT_VERSION + 1}'" in err and str(newer) in err and err.count("\n") == 1, err


def test_conversions_apply_in_version_order_to_what_was_written_before_each(monkeypatch):
    """One more entry in the table is one more conversion: a name of version 1 goes through both,
    one of version 2 through the later one only, one of the newest through none."""
    renamed = Conversion(FORMAT_VERSION + 1, name=lambda name: name.replace(".mlp.", ".ffn."))
    monkeypatch.setattr(legacy, "CONVERSIONS", (*legacy.CONVERSIONS, renamed))
    old = "exp_avg/model.blocks.1.mlp.deepspeed_moe.gate.wg.weight"
    assert current_name(old, 1) == "exp_avg/model.blocks.1.ffn.router_weight"
    assert current_name(old, 2) == "exp_avg/model.blocks.1.ffn.deepspeed_moe.gate.wg.weight"
    assert current_name(old, FORMAT_VERSION + 1) == old
    state = {"blocks.1.mlp.deepspeed_moe.gate.wg.weight": torch.zeros(3, 5)}
    assert set(current_model_state(state, 1)) == {"blocks.1.ffn.router_weight"}
