"""What a run reports besides its checkpoints: TensorBoard and W&B carry the numbers metrics.jsonl
and final_metrics.json hold (read back from the event file and the offline W&B run), the progress
line has open_clip's fields in a log file and on a terminal, and an error ends the output on its
own line."""

import contextlib
import io
import json
import logging
import re
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from limoe.cli import main
from limoe.config import load_config
from limoe.errors import LimoeError
from limoe.training.report_to import ScalarSinks
from tests.helpers import QUICK, ROOT, refused, run_args
from tests.training.wandb_history import wandb_history

ONE_SHARD = ROOT / "data_shards/heldout/00000.tar.gz"  # keeps evaluations and the final report short
RUN = ["train.steps=4", *QUICK, "train.eval_every=2", f"eval.retrieval={ONE_SHARD}", f"data.heldout={ONE_SHARD}"]
ROUTING_STATS = ("tokens", "routing_success", "dropped", "token_entropy", "marginal_entropy", "experts_used",
                 "top_share")


def _train_args(workdir: Path, *overrides: str) -> list[str]:
    return run_args("train", workdir, *RUN, *overrides)


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal, so the progress bar draws on it."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    """Four steps with evaluations at 2 and 4, reported to TensorBoard and an offline W&B run, with
    stderr a log file (no terminal)."""
    workdir, wandb_dir = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("wandb")
    log_file = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stderr(log_file):
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(wandb_dir))
        env.setenv("WANDB_SILENT", "true")
        assert main(_train_args(workdir, "train.report_to=[tensorboard, wandb]")) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((workdir / "final_metrics.json").read_text())
    return workdir, wandb_dir, records, final, log_file.getvalue()


def _expected_scalars(records: list[dict], final: dict) -> dict[tuple[str, int], float]:
    """{(tag, step): value} worked out from metrics.jsonl and final_metrics.json as docs/TRAINING.md names them."""
    expected = {}
    for record in records:
        step = record["step"]
        if "loss" in record:
            for key in ("loss", "lr", "grad_norm", "routing_success_image", "data_s", "batch_s"):
                expected[(f"train/{key}", step)] = record[key]
        for layer in record.get("routing", {}).get("layers", []):
            for modality in ("image", "text"):
                for stat in ROUTING_STATS:
                    if layer[modality][stat] is not None:
                        expected[(f"routing/block{layer['block']}/{modality}/{stat}", step)] = layer[modality][stat]
        for name, metrics in record.get("eval", {}).items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)):  # (not the per-reason counts of skipped samples, {} here)
                    expected[(f"eval/{name}/{metric}", step)] = value
    for metric, value in final["retrieval"].items():
        if isinstance(value, (int, float)):
            expected[(f"final/retrieval/{metric}", 4)] = value
    expected[("final/chance_R@5", 4)] = final["chance_R@5"]
    for layer in final["routing"]["layers"]:
        for modality in ("image", "text"):
            expected[(f"final/routing/block{layer['block']}/{modality}/routing_success", 4)] = \
                layer[modality]["routing_success"]
    return expected


def test_tensorboard_holds_the_routing_evaluation_and_final_numbers_of_the_json_files(reported_run):
    workdir, _, records, final, _ = reported_run
    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {(tag, event.step): event.value for tag in events.Tags()["scalars"] for event in events.Scalars(tag)}
    expected = _expected_scalars(records, final)
    assert {tag.split("/")[0] for tag, _ in expected} == {"train", "routing", "eval", "final"}
    assert ("routing/block3/text/routing_success", 2) in expected
    assert ("eval/retrieval/image_to_text_R@1", 4) in expected
    for key, value in expected.items():
        assert logged.get(key) == pytest.approx(value, rel=1e-6), key  # event files hold float32


def test_wandb_offline_run_holds_the_same_numbers(reported_run):
    _, wandb_dir, records, final, _ = reported_run
    history = wandb_history(wandb_dir)
    for (tag, step), value in _expected_scalars(records, final).items():
        assert history[step].get(tag) == pytest.approx(value, rel=1e-12), (tag, step)


def test_the_log_file_has_one_progress_line_per_log_step_with_lr_and_timings(reported_run):
    _, _, records, _, log_file = reported_run
    assert "\r" not in log_file  # no progress bar redraws in a log file
    lines = [line for line in log_file.splitlines() if line.startswith("Train step")]
    logged = [r for r in records if "loss" in r]
    assert len(lines) == len(logged) == 2
    first_eval = next(r["eval"]["retrieval"] for r in records if "eval" in r)
    for line, record in zip(lines, logged):
        step = record["step"]
        pattern = (rf"Train step {step}/4 \({step * 25}%\)  Data \(t\) \d+\.\d{{3}}s  Batch \(t\) \d+\.\d{{3}}s  "
                   rf"LR {record['lr']:.3e}  loss {record['loss']:.3f}  \d+ pairs/s  routed img/txt \d+%/\d+%")
        assert re.fullmatch(pattern + (f"  i→t R@1 {first_eval['image_to_text_R@1']:.1%}" if step == 4 else ""),
                            line), line


def test_report_to_nothing_writes_no_event_files(tmp_path):
    sinks = ScalarSinks(load_config("demo", ["train.report_to=[]"]), tmp_path)
    sinks.log({"train/loss": 1.0}, 1)
    sinks.close()
    assert list(tmp_path.iterdir()) == []


def test_report_to_wandb_without_wandb_installed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    refused(_train_args(tmp_path / "run", "train.report_to=[wandb]"), "pip install 'limoe[wandb]'")
    assert not (tmp_path / "run").exists()


def test_an_error_while_the_bar_is_drawn_is_the_last_line_on_its_own(tmp_path, monkeypatch):
    """A failure at step 2's checkpoint (as a full disk gives it) on a terminal: the bar, showing
    the progress fields, is closed first; the error follows on a line of its own and nothing after.
    A warning logged while the bar is drawn is a line of its own too."""
    from limoe.training import trainer

    def disk_full(*args, **kwargs):
        logging.getLogger("limoe.checkpoints.training").warning("the disk is nearly full")
        raise LimoeError("no space left on device writing the checkpoint; free some space and re-run.")

    monkeypatch.setattr(trainer.checkpoint, "save_training_checkpoint", disk_full)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(_train_args(tmp_path / "run", "train.eval_every=0")) == 2
    written = terminal.getvalue()
    assert "train:" in written and "Data (t)" in written and "Batch (t)" in written and "LR " in written
    error = "limoe: error: no space left on device writing the checkpoint; free some space and re-run.\n"
    assert written.endswith("\n" + error), written[-300:]
    assert "the disk is nearly full" in re.split(r"[\r\n]", written), written


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """The run's W&B id is kept in the workdir: the second start logs to the same run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config("demo", ["train.report_to=[wandb]"])
    ids = []
    for step in (2, 4):
        sinks = ScalarSinks(config, tmp_path)
        sinks.log({"train/loss": float(step)}, step)
        ids.append(sinks.wandb.id)
        sinks.close()
    assert ids[0] == ids[1] == (tmp_path / "wandb_run_id").read_text().strip()
    assert {run.name for run in tmp_path.glob("wandb/offline-run-*/run-*.wandb")} == {f"run-{ids[0]}.wandb"}


def test_the_progress_line_and_routing_record_cover_each_modality_of_the_model(tmp_path, capsys):
    """An image-text-audio model's step on an audio-text batch: audio and text routed, images '-'."""
    import types

    import torch

    from limoe.model.tower import build_model
    from limoe.training.progress import TrainingReporter
    from limoe.training.step import StepOutcome

    config = load_config(None, ["model.modalities=[image, text, audio]", "model.audio.clip_seconds=0.5",
                                "train.steps=2", "train.log_every=1", "train.routing_stats_every=2", "train.report_to=[]",
                                "model.moe.train_capacity_factor=100"])
    torch.manual_seed(0)
    model = build_model(config).train()
    _, routing = model.encode({"audio": torch.randn(3, 8000), "text": torch.randint(1, 1000, (3, 16))})
    outcome = StepOutcome({"loss": torch.tensor(1.0)}, True, 3, [(None, routing)])
    with TrainingReporter(config, tmp_path, 0, 0) as reporter:
        reporter.step(1, outcome, 1e-3, types.SimpleNamespace(bad={}, seen=3))  # logs progress, not yet routing
        layer = reporter.routing[None].statistics()["layers"][0]
    assert "routed img/txt/aud -/100%/100%" in capsys.readouterr().err  # capacity 100: nothing dropped
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["routing_success_image"] is None and record["routing_success_audio"] == 1.0
    assert layer["image"]["tokens"] == 0 and layer["audio"]["tokens"] == 3 * 8 * 2  # 0.5 s: 47 frames, 8 × 2 patches
