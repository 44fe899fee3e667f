"""Training checkpoints on disk: checksums and fallback, scanning without `latest`, pruning,
failed writes (disk full, read-only), another ZeRO stage on resume, and bad stored configs.

One process, in-process engines of the demo model; each test saves a checkpoint or two."""

import dataclasses
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from limoe.checkpoints import store
from limoe.checkpoints import training as checkpoint
from limoe.checkpoints.engine_state import engine_entries
from limoe.checkpoints.legacy import FORMAT_VERSION
from limoe.config import load_config
from limoe.errors import LimoeError
from limoe.training.session import start_session
from limoe.training.step import train_step
from limoe.training.trainer import build_engine
from tests.helpers import COMPARABLE, fixed_batch


def _config(*overrides: str):
    return load_config("demo", COMPARABLE + list(overrides))


def _engine(config):
    return build_engine(config, start_session(config))


def _steps(engine, config, count: int) -> float:
    images, tokens = fixed_batch(config)
    for _ in range(count):
        terms, _, _ = train_step(engine, images, tokens, config)
    return terms["loss"].item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An engine trained 2 steps, a workdir with its checkpoints at steps 1 and 2, and the
    model's weights at each (built once; tests work on copies of the workdir)."""
    workdir = tmp_path_factory.mktemp("pristine")
    config = _config()
    engine = _engine(config)
    weights = {}
    for step in (1, 2):
        _steps(engine, config, 1)
        checkpoint.save_training_checkpoint(engine, workdir, step, config)
        weights[step] = {k: v.clone() for k, v in engine.module.model.state_dict().items()}
    return engine, workdir, config, weights


@pytest.fixture
def run(trained, tmp_path):
    engine, pristine, config, weights = trained
    workdir = tmp_path / "run"
    shutil.copytree(pristine, workdir)
    return workdir, config, weights


def _step_dir(workdir: Path, step: int) -> Path:
    return workdir / store.CHECKPOINT_DIR / store.step_dir_name(step)


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "flipped model bytes": lambda d: _flip_bytes(d / "model.rank00000.safetensors"),
    "truncated optimizer file": lambda d: os.truncate(d / "optimizer.rank00000.safetensors", 1000),
    "missing manifest": lambda d: (d / "manifest.json").unlink(),
    "state.json not JSON": lambda d: (d / "state.json").write_bytes(b"\x80\x04junk"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_named_and_the_newest_complete_one_is_used(run, caplog, damage):
    workdir, _, weights = run
    DAMAGES[damage](_step_dir(workdir, 2))
    with caplog.at_level(logging.WARNING, logger="limoe.checkpoints.store"):
        found = checkpoint.find_resume_checkpoint(workdir)
        state, _ = checkpoint.consolidated_state(workdir)
    assert found.step == 1
    for name, tensor in weights[1].items():
        assert torch.equal(state[name], tensor), name
    named = [r.getMessage() for r in caplog.records if "step_00000002" in r.getMessage()]
    assert named and all(len(line.splitlines()) == 1 for line in named)


def test_when_no_checkpoint_is_complete_resuming_is_one_line_naming_it(run):
    workdir, _, _ = run
    for step in (1, 2):
        _flip_bytes(_step_dir(workdir, step) / "model.rank00000.safetensors")
    with pytest.raises(LimoeError, match=r"step_00000002 \(and 1 older ones\) cannot be used: model.rank00000"):
        checkpoint.find_resume_checkpoint(workdir)


@pytest.mark.parametrize("latest", [None, "step_99999999\n", "\x80\x04pickle"])
def test_a_missing_or_wrong_latest_is_found_by_scanning(run, caplog, latest):
    workdir, _, _ = run
    pointer = workdir / store.CHECKPOINT_DIR / store.LATEST
    pointer.unlink()
    if latest is not None:
        pointer.write_text(latest)
    with caplog.at_level(logging.WARNING, logger="limoe.checkpoints.store"):
        assert checkpoint.find_resume_checkpoint(workdir).step == 2
    assert any("found step_00000002 by scanning" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_pruning_keeps_the_newest_and_never_what_latest_names(trained, tmp_path, keep):
    engine, _, config, _ = trained
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, keep_checkpoints=keep))
    for step in (1, 2, 3):
        checkpoint.save_training_checkpoint(engine, tmp_path, step, config)
    root = tmp_path / store.CHECKPOINT_DIR
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert kept == ["step_00000003", "step_00000002"][: max(keep, 1)][::-1]
    assert (root / store.LATEST).read_text().strip() == "step_00000003"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_saving_after_a_fallback_replaces_the_checkpoints_passed_over(trained, run):
    """Resumed from step 1 past a damaged step 2: the next save (here of step 1 again, which
    replaces the old one in place) leaves the run's own timeline only."""
    workdir, config, _ = run
    _flip_bytes(_step_dir(workdir, 2) / "model.rank00000.safetensors")
    assert checkpoint.find_resume_checkpoint(workdir).step == 1
    checkpoint.save_training_checkpoint(trained[0], workdir, 1, config)
    root = workdir / store.CHECKPOINT_DIR
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert checkpoint.find_resume_checkpoint(workdir).step == 1


def _failing_writes(monkeypatch, error_number: int):
    """The next tensor file write gets half way, then fails as the system would."""
    def write(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(error_number, os.strerror(error_number))
    monkeypatch.setattr(store, "save_safetensors", write)


@pytest.mark.parametrize("error_number, reason", [(errno.ENOSPC, "the disk is full"),
                                                  (errno.EROFS, "the file system is read-only")])
def test_a_failed_save_is_one_line_and_leaves_latest_and_the_previous_checkpoint(trained, run, monkeypatch,
                                                                                   error_number, reason):
    workdir, config, _ = run
    engine = trained[0]
    _failing_writes(monkeypatch, error_number)
    with pytest.raises(LimoeError) as error:
        checkpoint.save_training_checkpoint(engine, workdir, 3, config)
    message = str(error.value)
    assert reason in message and "step_00000003" in message and len(message.splitlines()) == 1
    root = workdir / store.CHECKPOINT_DIR
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert (root / store.LATEST).read_text().strip() == "step_00000002"
    assert checkpoint.find_resume_checkpoint(workdir).step == 2


def test_a_read_only_checkpoint_folder_is_one_line(trained, run, monkeypatch):
    workdir, config, _ = run
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if Path(path).parent == workdir / store.CHECKPOINT_DIR:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(LimoeError, match="the file system is read-only"):
        checkpoint.save_training_checkpoint(trained[0], workdir, 3, config)
    assert checkpoint.find_resume_checkpoint(workdir).step == 2


def _loss(engine, config) -> float:
    """The loss of the fixed batch, forward only (router noise is off: deterministic)."""
    images, tokens = fixed_batch(config)
    with torch.no_grad():
        return engine(images, tokens)[0].item()


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_a_zero_0_checkpoint_resumes_under_zero_1_and_2(trained, run, zero_stage):
    """The same weights, moments, steps, learning rate and loss after the restore."""
    saved, _, config, _ = trained
    workdir, _, _ = run
    resumed_config = _config(f"distributed.zero_stage={zero_stage}")
    resumed = _engine(resumed_config)
    checkpoint.restore_training_checkpoint(resumed, checkpoint.find_resume_checkpoint(workdir), resumed_config)
    for before, after in zip(engine_entries(saved, True, True), engine_entries(resumed, True, True)):
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), name
    assert resumed.get_lr() == saved.get_lr()
    assert _loss(resumed, resumed_config) == _loss(saved, config)
    _steps(resumed, resumed_config, 1)  # and it trains on


def _update_manifest(step_dir: Path, name: str) -> None:
    """Record the rewritten file `name` in the manifest, as someone crafting a checkpoint would."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (step_dir / name).stat().st_size, "sha256": store._sha256(step_dir / name)}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_state(step_dir: Path, change) -> None:
    """Edit state.json and update the manifest."""
    state = json.loads((step_dir / "state.json").read_text())
    change(state)
    (step_dir / "state.json").write_text(json.dumps(state))
    _update_manifest(step_dir, "state.json")


def _rename_stored(workdir: Path, rename, version: int) -> int:
    """Keep only the step-2 checkpoint and store its tensors under `rename(name)`, as the limoe
    that wrote format `version` named them; returns how many names changed."""
    shutil.rmtree(_step_dir(workdir, 1))
    step_dir = _step_dir(workdir, 2)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["version"] == FORMAT_VERSION
    (step_dir / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    renamed = 0
    for path in step_dir.glob("*.safetensors"):
        tensors = load_file(str(path))
        old = {rename(name): value for name, value in tensors.items()}
        renamed += sum(name not in tensors for name in old)
        save_file(old, str(path))
        _update_manifest(step_dir, path.name)
    return renamed


def _assert_resumes_as_saved(saved, workdir: Path, config) -> None:
    """A new engine resumed from `workdir` holds the weights, moments and steps `saved` held."""
    resumed = _engine(config)
    checkpoint.restore_training_checkpoint(resumed, checkpoint.find_resume_checkpoint(workdir), config)
    for before, after in zip(engine_entries(saved, True, True), engine_entries(resumed, True, True)):
        for name in before:
            assert torch.equal(before[name], after[name]), name


def test_a_checkpoint_with_the_router_names_of_per_expert_layers_resumes(trained, run):
    """Checkpoints written before the experts were stacked (format version 1) name each router
    `…mlp.deepspeed_moe.gate.wg.weight` (also its Adam moments): they restore the same state."""
    saved, _, config, _ = trained
    workdir, _, _ = run
    renamed = _rename_stored(workdir, lambda name: name.replace("mlp.router_weight", "mlp.deepspeed_moe.gate.wg.weight"),
                             version=1)
    assert renamed >= 2 * len(config.model.moe_layers)  # the weights and at least one optimizer entry each
    _assert_resumes_as_saved(saved, workdir, config)


# Today's name → the name before the modality registry, for the demo model's per-modality modules.
_BEFORE_REGISTRY = {"embedders.image.patch_embed.": "patch_embed.", "embedders.text.token_embed.": "token_embed.",
                    "pools.image.": "image_pool.", "pools.text.": "text_pool.",
                    "projections.image.": "image_proj.", "projections.text.": "text_proj."}


def _name_before_registry(name: str) -> str:
    for today, before in _BEFORE_REGISTRY.items():
        name = name.replace(f"model.{today}", f"model.{before}")
    return name


def test_a_checkpoint_with_the_tower_names_from_before_the_modality_registry_resumes(trained, run):
    """Checkpoints written before the registry (format version 2) name the embedders, pooling heads and projections
    as the tower's attributes (`model.patch_embed.weight`, `exp_avg/model.text_proj.weight`): they
    restore the same state, and export the same weights."""
    saved, _, config, weights = trained
    workdir, _, _ = run
    assert _rename_stored(workdir, _name_before_registry, version=2) >= 3 * 7  # 7+ tensors: weights and 2+ Adam entries each
    _assert_resumes_as_saved(saved, workdir, config)
    state, _ = checkpoint.consolidated_state(workdir)
    assert state.keys() == weights[2].keys() and all(torch.equal(state[k], weights[2][k]) for k in state)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["config"]["model"].update(width="wide"), "'model.width' must be of type int"),
    (lambda s: s["config"]["model"].update(width=256, heads=2), "does not fit its config's model: tensor '"),
])
def test_a_stored_config_that_does_not_fit_is_one_line(run, change, message):
    workdir, _, _ = run
    shutil.rmtree(_step_dir(workdir, 1))
    _rewrite_state(_step_dir(workdir, 2), change)
    with pytest.raises(LimoeError, match=message) as error:
        checkpoint.export_workdir(workdir, workdir / "out.safetensors")
    assert len(str(error.value).splitlines()) == 1
    assert not list(workdir.glob("*out.safetensors*"))
