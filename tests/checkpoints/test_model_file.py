"""Exported model files and folders: whatever is wrong with the embedded config or the tensors is
one line naming the file, and a failed write leaves neither the file nor a temporary one."""

import errno
import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from limoe.checkpoints import model_file, read_config, save_model_file
from limoe.config import Config, load_model_config
from limoe.errors import LimoeError
from limoe.model.tower import build_model
from tests.helpers import refused

HELDOUT = str(Path(__file__).resolve().parents[2] / "data_shards" / "heldout")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    config = Config(model=load_model_config("limoe-tiny"))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model_file(build_model(config), config, path)
    return path


@pytest.mark.parametrize("stored, message", [
    ("{not json", "the stored config is not valid JSON"),
    ("[1, 2]", "the stored config is a list, not a mapping of keys"),
    ('{"model": {"width": "wide"}}', "'model.width' must be of type int"),
    ('{"model": {"width": 256, "heads": 2}}', "does not fit its config's model: tensor '"),
])
def test_an_exported_file_with_a_bad_embedded_config_is_one_line(exported, tmp_path, stored, message):
    path = tmp_path / "bad.safetensors"
    save_file(load_file(str(exported)), str(path), metadata={model_file.CONFIG_KEY: stored})
    refused(["eval", "retrieval", "--checkpoint", str(path), "--data", HELDOUT, "--device", "cpu"], message,
            str(path))


def test_a_model_folder_whose_config_is_not_a_mapping_is_one_line(exported, tmp_path):
    (tmp_path / "limoe_config.json").write_text(json.dumps(["not", "a", "config"]))
    (tmp_path / "model.safetensors").write_bytes(exported.read_bytes())
    with pytest.raises(LimoeError, match="limoe_config.json: the stored config is a list"):
        read_config(tmp_path)


def test_a_failed_export_write_leaves_no_file_behind(exported, tmp_path, monkeypatch):
    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_file, "save_safetensors", disk_full)
    config = Config(model=load_model_config("limoe-tiny"))
    with pytest.raises(LimoeError, match=r"could not write .*out.safetensors: the disk is full"):
        save_model_file(build_model(config), config, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []
