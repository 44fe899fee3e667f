"""Evaluation during training: the numbers a run logs at a step equal `limoe eval` on that step's
checkpoint, on one process and on two with expert parallelism 2 (which take turns encoding);
bad evaluation sets fail before training starts; the audio sets of a model with audio are logged
as `limoe eval --modality audio` reports them."""

import json
from pathlib import Path

import pytest

from limoe.cli import main
from tests.helpers import AUDIO_HELDOUT, QUICK, QUICK_TASKS, ROOT, refused, run_args, write_config
from tests.training.processes import run_processes

# One shard of each held-out set keeps the four evaluations per run short.
ZEROSHOT = ROOT / "data_shards/heldout_cls/00000.tar.gz"
RETRIEVAL = ROOT / "data_shards/heldout/00000.tar.gz"
RUN = ["train.steps=4", *QUICK, "train.eval_every=2", "eval.zeroshot.templates=openai",
       f"eval.zeroshot.data={ZEROSHOT}", f"eval.retrieval={RETRIEVAL}", f"data.heldout={RETRIEVAL}"]


def _train_args(workdir: Path, *overrides: str) -> list[str]:
    return run_args("train", workdir, *RUN, *overrides)


def _logged_evaluations(workdir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval"] for r in records if "eval" in r}


def _limoe_eval(checkpoint: Path, output: Path) -> dict:
    """Both evaluations through the `limoe eval` command on one checkpoint directory."""
    common = ["--checkpoint", str(checkpoint), "--workers", "0", "--device", "cpu"]
    assert main(["eval", "zeroshot", *common, "--data", str(ZEROSHOT), "--templates", "openai",
                 "--output", str(output / "zeroshot.json")]) == 0
    assert main(["eval", "retrieval", *common, "--data", str(RETRIEVAL),
                 "--output", str(output / "retrieval.json")]) == 0
    return {name: json.loads((output / f"{name}.json").read_text()) for name in ("zeroshot", "retrieval")}


def _assert_equal_to_limoe_eval(workdir: Path, tmp_path: Path) -> None:
    logged = _logged_evaluations(workdir)
    assert sorted(logged) == [2, 4]
    for step, results in logged.items():
        expected = _limoe_eval(workdir / "checkpoints" / f"step_{step:08d}", tmp_path)
        assert results == expected, step
    assert logged[2] != logged[4]  # the model changed between the two evaluations
    assert logged[4]["zeroshot"]["samples"] > 100 and logged[4]["retrieval"]["images"] > 100


def test_one_process_logs_what_limoe_eval_reports_on_the_same_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    assert main(_train_args(workdir)) == 0
    _assert_equal_to_limoe_eval(workdir, tmp_path)
    assert list((workdir / "tensorboard").iterdir())


@pytest.mark.slow  # two processes training; one process's evaluation is checked by default above
def test_two_processes_with_expert_parallelism_evaluate_together(tmp_path):
    """Both ranks evaluate, taking turns (200 images in batches of 64: the first two batches are
    dealt out, the rest both encode; 69 classes × 80 templates, 10 classes a forward: six of the
    seven forwards dealt out); nothing hangs, and rank 0 logs what a single process reports on
    the checkpoint."""
    workdir = tmp_path / "run"
    run_processes("limoe", _train_args(workdir, "distributed.expert_parallel_size=2", "train.device=cpu"),
                  world_size=2, timeout=900)
    _assert_equal_to_limoe_eval(workdir, tmp_path)


@pytest.mark.parametrize("override, named", [
    ("eval.retrieval=no/such/shards", "eval.retrieval"),
    ("eval.zeroshot.classnames=no-such-file.txt", "eval.zeroshot.classnames"),
    ("eval.zeroshot.templates=no-such-templates.txt", "no-such-templates.txt"),
])
def test_a_bad_evaluation_set_fails_before_training(tmp_path, override, named):
    workdir = tmp_path / "run"
    refused(_train_args(workdir, override), named)
    assert not (workdir / "checkpoints").exists()


def test_eval_every_without_a_set_is_refused(tmp_path):
    refused(run_args("train", tmp_path / "run", "train.eval_every=10"), "eval.zeroshot.data or eval.retrieval")


def test_an_evaluation_lost_to_a_kill_is_run_on_resume_once(tmp_path):
    """A kill during step 4's evaluation, after its checkpoint was published, leaves metrics.jsonl
    without that record (and no export): the resumed run evaluates the checkpoint it loads, which
    is step 4's model, and logs what the killed run would have logged; a further run adds nothing."""
    workdir = tmp_path / "run"
    args = _train_args(workdir, "eval.zeroshot.data=null")  # retrieval alone keeps it short
    assert main(args) == 0
    recorded = _logged_evaluations(workdir)
    assert sorted(recorded) == [2, 4]
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(line for line in lines if not ('"eval"' in line and json.loads(line)["step"] == 4)))
    for output in ("model.safetensors", "final_metrics.json"):
        (workdir / output).unlink()
    for _ in range(2):
        assert main(args) == 0
        evaluations = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval"' in line]
        assert [record["step"] for record in evaluations] == [2, 4]
        assert evaluations[1]["eval"] == recorded[4]


AUDIO_ZEROSHOT = AUDIO_HELDOUT / "00000.tar.gz"  # 32 labelled clips and their captions
AUDIO_RUN = {"base": "audio-demo", "train": {"steps": 2, "eval_every": 1},
             "data": {"heldout": str(RETRIEVAL)},
             "eval": {"audio": {"zeroshot": {"data": str(AUDIO_ZEROSHOT), "classnames": str(AUDIO_HELDOUT / "classnames.txt")},
                                "retrieval": str(AUDIO_ZEROSHOT)}},
             "tasks": [{"name": "pairs", "kind": "contrastive", "data": "data_shards/train", "batch_size": 8, "steps": 1},
                       {"name": "sounds", "kind": "contrastive", "data": "data_shards/audio_train",
                        "modalities": ["audio", "text"], "batch_size": 8, "steps": 1}]}


def test_audio_sets_are_evaluated_during_training_as_limoe_eval_modality_audio_does(tmp_path):
    """A co-training run of the audio demo with eval.audio sets logs, under eval.audio, what
    `limoe eval zeroshot|retrieval --modality audio` reports on each step's checkpoint."""
    workdir = tmp_path / "run"
    config = write_config(tmp_path / "audio.yaml", AUDIO_RUN)
    assert main(run_args("train", workdir, *QUICK_TASKS, "train.checkpoint_every=1", config=config)) == 0
    logged = _logged_evaluations(workdir)
    assert sorted(logged) == [1, 2]
    for step, results in logged.items():
        assert list(results) == ["audio"]  # no image set was configured
        common = ["--checkpoint", str(workdir / "checkpoints" / f"step_{step:08d}"), "--modality", "audio",
                  "--workers", "0", "--device", "cpu"]
        expected = {}
        for name in ("zeroshot", "retrieval"):
            output = tmp_path / f"{name}.json"
            assert main(["eval", name, *common, "--data", str(AUDIO_ZEROSHOT), "--output", str(output)]) == 0
            expected[name] = json.loads(output.read_text())
        assert results["audio"] == expected, step
    assert logged[1] != logged[2]
    assert logged[2]["audio"]["zeroshot"]["samples"] == 32 and logged[2]["audio"]["retrieval"]["clips"] > 16


def test_audio_evaluation_sets_need_a_model_with_audio(tmp_path):
    refused(_train_args(tmp_path / "run", f"eval.audio.retrieval={AUDIO_ZEROSHOT}"),
            "eval.audio.retrieval is set but model.modalities ['image', 'text'] has no audio")
