"""`limoe train` end to end on the shipped shards: metrics, resume, export, bad input."""

import json
import os
import signal
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
from limoe.training.step import train_step
from limoe.training.trainer import build_engine, lr_multiplier, start_session

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["train.batch_size=16", "data.workers=0", "train.log_every=2", "train.checkpoint_every=2",
         "train.routing_stats_every=2", "optim.warmup_steps=2"]


def _args(workdir: Path, *overrides: str) -> list[str]:
    args = ["train", "--workdir", str(workdir)]
    for override in (*QUICK, *overrides):
        args += ["--set", override]
    return args


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo config for 4 steps, run in-process like a user would from the shell; in two
    micro-batches of one routing group each."""
    workdir = tmp_path_factory.mktemp("demo")
    assert main(_args(workdir, "train.steps=4", "train.micro_batch_size=8")) == 0
    return workdir


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


def test_rerunning_a_finished_run_resumes_without_training(demo_run):
    before = (demo_run / "metrics.jsonl").read_text()
    assert main(_args(demo_run, "train.steps=4", "train.micro_batch_size=8")) == 0
    assert (demo_run / "metrics.jsonl").read_text() == before


def test_a_workdir_of_another_architecture_is_refused(demo_run, capsys):
    assert main(_args(demo_run, "train.steps=4", "model.width=64", "model.heads=2")) == 2
    assert "different architecture" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("data.train=/no/such/shards", "/no/such/shards"),
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("train.steps=three", "'train.steps' must be of type int"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, override, message):
    assert main(_args(tmp_path / "run", override)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("contrastive, layout", [("clip", "safetensors"), ("siglip", "hf")])
def test_export_then_load_gives_the_live_models_embeddings(tmp_path, contrastive, layout):
    """Also the learned temperature and SigLIP's bias, which the model holds and exports."""
    config = load_config("demo", ["train.batch_size=8", "train.device=cpu", f"loss.contrastive={contrastive}"])
    engine = build_engine(config, start_session(config))
    images, tokens = torch.randn(8, 3, 64, 64), torch.randint(1, 1000, (8, 16))
    train_step(engine, images, tokens, config)
    dump_config(config, tmp_path / "config.yaml")
    checkpoint.save_training_checkpoint(engine, tmp_path, 1, {"step": 1}, keep=1)
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
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}  # set by in-process runs
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while checkpoint.latest_checkpoint(tmp_path) is None or checkpoint.latest_checkpoint(tmp_path).name < "step_00000006":
        assert time.time() < deadline and first.poll() is None, "the first run ended or stalled before step 6"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = int(checkpoint.latest_checkpoint(tmp_path).name.split("_")[1])
    assert killed_at < 24
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000024"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if "loss" in r and r["step"] > killed_at]
    assert resumed and resumed[-1]["step"] == 24
    assert resumed[-1]["pairs_seen"] == 24 * 16  # counted across the kill, not from the resume
    config = load_config(str(tmp_path / "config.yaml"))
    assert resumed[-1]["lr"] == pytest.approx(config.optim.lr * lr_multiplier(24, config), rel=1e-6)


@pytest.mark.parametrize("skip", [False, True])
def test_a_diverged_run_stops_with_a_clear_message_and_keeps_no_bad_checkpoint(tmp_path, capsys, skip):
    args = _args(tmp_path, "train.steps=40", "optim.lr=1.0e30", "optim.warmup_steps=1", "optim.grad_clip=0",
                 f"train.skip_nonfinite_steps={str(skip).lower()}", "train.checkpoint_every=1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("in a row had a non-finite loss" if skip else "the loss became") in err
    last = checkpoint.latest_checkpoint(tmp_path)
    assert last is None or int(last.name.split("_")[1]) < 40
