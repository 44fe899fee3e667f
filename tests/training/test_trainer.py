"""`limoe train` end to end on the shipped shards: metrics, resume, export, bad input."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from limoe.checkpoints import training as checkpoint
from limoe.cli import main
from limoe.checkpoints import load_model
from limoe.config import dump_config, load_config
from limoe.training.session import start_session
from limoe.training.step import train_step
from limoe.training.trainer import build_engine, lr_multiplier
from limoe.training.workdir import keep_metrics_until, locked_workdir
from tests.child_env import child_env
from tests.helpers import QUICK, ROOT, refused, run_args


def _args(workdir: Path, *overrides: str) -> list[str]:
    return run_args("train", workdir, *QUICK, *overrides)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo config for 4 steps, run in-process like a user would from the shell; in two
    micro-batches of one routing group each. Tests that run again in it or change it take a copy
    (`demo_copy`)."""
    workdir = tmp_path_factory.mktemp("demo")
    assert main(_args(workdir, "train.steps=4", "train.micro_batch_size=8")) == 0
    return workdir


@pytest.fixture
def demo_copy(demo_run, tmp_path) -> Path:
    copy = tmp_path / "demo"
    shutil.copytree(demo_run, copy)
    return copy


def test_demo_writes_metrics_checkpoints_and_a_final_report(demo_run):
    records = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert [r["pairs_seen"] for r in steps] == [32, 64]  # batch 16
    for key in ("contrastive", "importance", "load", "local_entropy_image", "global_entropy_text", "logit_scale",
                "lr", "pairs_per_s", "grad_norm", "bad_samples", "routing_success_image"):
        assert key in steps[-1], key
    routing = [r for r in records if "routing" in r]
    assert routing and len(routing[-1]["routing"]["layers"]) == 2
    assert checkpoint.latest_checkpoint(demo_run).name == "step_00000004"
    final = json.loads((demo_run / "final_metrics.json").read_text())
    assert final["retrieval"]["images"] > 300
    assert 0.0 <= final["retrieval"]["image_to_text_R@5"] <= 1.0
    assert (demo_run / "model.safetensors").is_file()
    assert list((demo_run / "tensorboard").iterdir())


def test_rerunning_a_finished_run_resumes_without_training(demo_copy):
    """Also with another kernel backend and eval capacity: how the weights are computed, not which."""
    before = (demo_copy / "metrics.jsonl").read_text()
    assert main(_args(demo_copy, "train.steps=4", "train.micro_batch_size=8", "model.moe.backend=triton",
                      "model.moe.eval_capacity_factor=4.0")) == 0
    assert (demo_copy / "metrics.jsonl").read_text() == before


def test_a_workdir_of_another_architecture_is_refused(demo_copy):
    refused(_args(demo_copy, "train.steps=4", "model.width=64", "model.heads=2"),
            "different architecture: model.heads is 4 there and 2 now (and 1 more keys)")


def test_the_architecture_check_reads_the_checkpoint_not_config_yaml(demo_copy):
    (demo_copy / "config.yaml").unlink()
    refused(_args(demo_copy, "train.steps=4", "model.width=64", "model.heads=2"), "different architecture")


def test_a_second_trainer_on_a_workdir_refuses_naming_the_first(tmp_path):
    with locked_workdir(tmp_path, rank=0):  # a trainer is running in this workdir
        refused(_args(tmp_path, "train.steps=2"),
                f"is in use by limoe train (pid {os.getpid()} on host {socket.gethostname()}")
    assert not (tmp_path / "checkpoints").exists()
    with locked_workdir(tmp_path, rank=0):  # released when the first run ends
        pass


def test_an_unwritable_workdir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    refused(_args(tmp_path / "file" / "run", "train.steps=2"), "cannot write in workdir")


@pytest.mark.parametrize("override, message", [
    ("data.train=/no/such/shards", "/no/such/shards"),
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("train.steps=three", "'train.steps' must be of type int"),
    ("train.batch_size=10000000", "GiB of host memory"),  # within its range, beyond any machine at 64 px
    # routing groups of 8 (limoe-tiny): 30 examples go into ceil(30/8) = 4 groups of ceil(30/4) = 8, 32 slots
    ("train.batch_size=30", "train.batch_size 30 gives 30 examples per GPU, not a multiple of model.moe.group_size 8"
                            ": they would be routed in 4 groups of 8 with 2 empty examples as padding. Use a multiple "
                            "of 8 such as 24 or 32."),
])
def test_bad_input_is_one_line_and_exit_2_and_leaves_no_workdir(tmp_path, override, message):
    refused(_args(tmp_path / "run", override), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("contrastive, layout", [("clip", "safetensors"), ("siglip", "hf")])
def test_export_then_load_gives_the_live_models_embeddings(tmp_path, contrastive, layout):
    """Also the learned temperature and SigLIP's bias, which the model holds and exports."""
    config = load_config("demo", ["train.batch_size=8", "train.device=cpu", f"loss.contrastive={contrastive}"])
    engine = build_engine(config, start_session(config))
    images, tokens = torch.randn(8, 3, 64, 64), torch.randint(1, 1000, (8, 16))
    train_step(engine, images, tokens, config)
    dump_config(config, tmp_path / "config.yaml")
    checkpoint.save_training_checkpoint(engine, tmp_path, 1, config)
    output = tmp_path / ("m.safetensors" if layout == "safetensors" else "model")
    assert main(["export", "--workdir", str(tmp_path), "--output", str(output), "--format", layout]) == 0
    loaded, _ = load_model(output)
    live = engine.module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), live.encode_image(images))
        torch.testing.assert_close(loaded.encode_text(tokens), live.encode_text(tokens))
    assert loaded.logit_scale.item() == live.logit_scale.item() != config.loss.logit_scale_init
    if contrastive == "siglip":
        assert loaded.logit_bias.item() == live.logit_bias.item() != config.loss.logit_bias_init


def test_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path):
    """SIGKILL mid-run, then the same command: it continues from the last checkpoint to the end.

    Restored: weights, AdamW moments, the LR schedule and the step. The data stream restarts
    from a seed derived from (train.seed, step), so later batches differ from an uninterrupted run.
    """
    command = [sys.executable, "-m", "limoe", *_args(tmp_path, "train.steps=24")]
    env = child_env(OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while checkpoint.latest_checkpoint(tmp_path) is None or checkpoint.latest_checkpoint(tmp_path).name < "step_00000006":
        assert time.time() < deadline and first.poll() is None, "the first run ended or stalled before step 6"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = int(checkpoint.latest_checkpoint(tmp_path).name.split("_")[1])
    assert killed_at < 24
    with (tmp_path / "metrics.jsonl").open("a") as metrics:  # what a kill between a log and its checkpoint leaves
        metrics.write(json.dumps({"step": killed_at + 2, "loss": 9.9}) + "\n" + '{"step": 99, "lo')
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000024"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if "loss" in r and r["step"] > killed_at]
    assert resumed and resumed[-1]["step"] == 24
    for kind in ("loss", "routing"):
        logged = [r["step"] for r in records if kind in r]
        assert logged == sorted(set(logged)), f"{kind} records repeat a step: {logged}"
    assert resumed[-1]["pairs_seen"] == 24 * 16  # counted across the kill, not from the resume
    config = load_config(str(tmp_path / "config.yaml"))
    assert resumed[-1]["lr"] == pytest.approx(config.optim.lr * lr_multiplier(24, config), rel=1e-6)


def test_metrics_keep_each_step_once_after_any_number_of_kills(tmp_path):
    """Each resume drops what was logged after its checkpoint (and a line cut short), so the
    steps logged again appear once."""
    metrics = tmp_path / "metrics.jsonl"

    def log(*steps):
        with metrics.open("a") as file:
            file.writelines(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in steps)

    log(2, 4, 6)  # checkpoints at 4: killed after logging 6
    metrics.write_text(metrics.read_text() + '{"step": 8, "lo')  # and in the middle of a line
    keep_metrics_until(tmp_path, 4)
    log(6, 8, 10)  # resumed at 4; killed again after logging 10, checkpoint at 8
    keep_metrics_until(tmp_path, 8)
    log(10, 12)
    before = metrics.read_bytes()
    keep_metrics_until(tmp_path, 12)  # nothing to drop: the file is left as it is
    assert metrics.read_bytes() == before
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("skip", [False, True])
def test_a_diverged_run_stops_with_a_clear_message_and_keeps_no_bad_checkpoint(tmp_path, skip):
    args = _args(tmp_path, "train.steps=40", "optim.lr=1.0e30", "optim.warmup_steps=1", "optim.grad_clip=0",
                 f"train.skip_nonfinite_steps={str(skip).lower()}", "train.checkpoint_every=1")
    refused(args, "in a row had a non-finite loss" if skip else "the loss became", after_progress=True)
    last = checkpoint.latest_checkpoint(tmp_path)
    assert last is None or int(last.name.split("_")[1]) < 40
