"""`limoe pretrain` end to end, then `limoe train` from its weights with FLIP masking."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from limoe.cli import main
from limoe.config import load_config
from limoe.model.tower import Limoe
from tests.helpers import QUICK, refused, run_args

HELDOUT = "data_shards/heldout/00001.tar.gz"  # one held-out shard (143 pairs) keeps the final reports short
RUN = [*QUICK, f"data.heldout={HELDOUT}", "train.steps=4"]
STAGES = ["pretrain.unimodal_steps=2", "pretrain.bimodal_steps=2", "pretrain.decoder_width=32",
          "pretrain.decoder_depth=1", "pretrain.decoder_heads=2"]


def _args(command: str, workdir: Path, *overrides: str) -> list[str]:
    return run_args(command, workdir, *RUN, *overrides)


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    assert main(_args("pretrain", workdir, *STAGES)) == 0
    return workdir


def test_pretraining_logs_each_task_and_routing_per_stage(pretrained):
    records = _records(pretrained)
    losses = {key for r in records for key in r if key.endswith("_loss")}
    assert losses == {"masked_image_loss", "masked_text_loss", "masked_image_given_text_loss",
                      "masked_text_given_image_loss"}
    routing = {r["stage"]: r["routing"] for r in records if "routing" in r}
    assert set(routing) == {"unimodal", "bimodal"}
    # Unimodal masked images route their 16 visible patches of 64; bimodal adds whole images (MLM given the image).
    assert routing["unimodal"]["layers"][0]["image"]["tokens"] == 16 * 16
    assert routing["bimodal"]["layers"][0]["image"]["tokens"] == 16 * 16 + 16 * 64
    final = json.loads((pretrained / "final_metrics.json").read_text())
    assert set(final) == {"masked_image", "masked_text", "masked_image_given_text", "masked_text_given_image"}
    assert final["masked_image"]["patches"] == 143 * 48


def test_the_export_is_exactly_a_contrastive_model_and_evaluates(pretrained, tmp_path):
    exported = load_file(str(pretrained / "model.safetensors"))
    expected = Limoe(load_config(str(pretrained / "config.yaml")).model).state_dict()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in expected.items()}
    assert main(["eval", "retrieval", "--checkpoint", str(pretrained / "model.safetensors"), "--data", HELDOUT,
                 "--workers", "0"]) == 0
    assert main(["eval", "knn", "--checkpoint", str(pretrained / "model.safetensors"), "--data",
                 "data_shards/heldout_cls", "--workers", "0", "--random-init", "--output", str(tmp_path / "knn.json")]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert knn["images"] == 331 and 0 < knn["knn_top1"] < 1 and 0 < knn["random_init_knn_top1"] < 1


def test_contrastive_training_starts_from_the_pretrained_workdir_with_flip(pretrained, tmp_path, caplog):
    """init_from a pretraining workdir: its heads are left out; FLIP drops half the patches
    (32 of 64 routed per image) until the last 2 steps. Re-running resumes from the run's own
    checkpoint and does not load the pretrained weights again."""
    args = _args("train", tmp_path, f"train.init_from={pretrained}", "train.image_mask_ratio=0.5",
                 "train.unmasked_steps=2")
    with caplog.at_level(logging.INFO, logger="limoe.checkpoints.warm_start"):
        assert main(args) == 0
    started = [r.message for r in caplog.records if r.name == "limoe.checkpoints.warm_start"]
    assert len(started) == 1 and "tensors loaded" in started[0]
    routing = {r["stage"]: r["routing"]["layers"][0]["image"]["tokens"] for r in _records(tmp_path) if "routing" in r}
    assert routing == {"masked": 2 * 16 * 32, "unmasked": 2 * 16 * 64}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="limoe.checkpoints.warm_start"):
        assert main(args) == 0
    assert not [r for r in caplog.records if r.name == "limoe.checkpoints.warm_start"]


def test_contrastive_training_in_the_pretraining_workdir_is_refused_and_changes_nothing(pretrained):
    saved = (pretrained / "config.yaml").read_text()
    refused(_args("train", pretrained), "was written by limoe pretrain, not limoe train")
    assert (pretrained / "config.yaml").read_text() == saved


def test_a_killed_pretraining_run_resumes_from_its_last_checkpoint(pretrained, tmp_path, caplog):
    """Killed after step 2's checkpoint: step 4's is gone (never published) and nothing was exported.
    The re-run resumes at step 2 in the bimodal stage, logs steps 3 and 4 once, and exports."""
    workdir = tmp_path / "killed"
    shutil.copytree(pretrained, workdir)
    shutil.rmtree(workdir / "checkpoints" / "step_00000004")
    (workdir / "model.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="limoe.checkpoints.training"):
        assert main(_args("pretrain", workdir, *STAGES)) == 0
    assert any("resuming from" in r.message and "at step 2" in r.message for r in caplog.records)
    steps = [r["step"] for r in _records(workdir) if "loss" in r]
    assert steps == [2, 4]
    resumed = [r for r in _records(workdir) if "routing" in r and r["step"] == 4]
    assert [r["stage"] for r in resumed] == ["bimodal"]
    state = json.loads((workdir / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["objective"] == "pretraining"
    assert (workdir / "model.safetensors").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.unimodal_steps=1", "pretrain.bimodal_steps=1"], "the pretraining stages take 2 steps"),
    (["train.micro_batch_size=8"], "train.micro_batch_size splits contrastive training's batch"),
    (["model.modalities=[image, text, video]", "train.video_mask_ratio=0.5"],
     "train.video_mask_ratio is contrastive training's tube dropping (FLIP) for video clips; limoe pretrain "
     "does not use it. Remove train.video_mask_ratio."),
])
def test_settings_pretraining_cannot_run_are_one_line_and_exit_2(tmp_path, overrides, message):
    refused(_args("pretrain", tmp_path, *STAGES, *overrides), message)
