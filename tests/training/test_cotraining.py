"""Co-training (`tasks:`): accumulation, per-task reports, the LR per task, 2 processes = 1, bad input."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from limoe.checkpoints.training import consolidated_state
from limoe.cli import main
from limoe.config import load_config
from limoe.data.pipeline import LabelledBatch, TrainBatch
from limoe.training.candidates import prompt_tokens
from limoe.training.cotraining import ClassificationTask, Task, task_gradients
from limoe.training.schedules import TaskSchedule
from limoe.training.session import Session, start_session
from limoe.training.trainer import build_engine, lr_multiplier
from tests.helpers import QUICK_TASKS, Killed, killed_after_checkpoint, refused, run_args, write_config
from tests.training.processes import run_processes


def _config_file(tmp_path: Path, schedule="weighted", cls="data_shards/train_cls", extra=None,
                 kind="classification") -> str:
    """The demo config on pairs and a classification task on `cls` (`extra` its further keys), 4 steps."""
    subgroups = {"name": "subgroups", "kind": kind, "data": cls, "batch_size": 6, "steps": 1, "lr_scale": 0.25,
                 **(extra or {"candidates": "all"})}
    return write_config(tmp_path / "cotrain.yaml", {
        "base": "demo",
        "train": {"steps": 4},
        "tasks": [{"name": "pairs", "kind": "contrastive", "data": "data_shards/train", "batch_size": 8, "steps": 3},
                  subgroups],
        "schedule": {"kind": schedule, "seed": 0},
    })


def _args(tmp_path: Path, config: str, *overrides: str) -> list[str]:
    return run_args("train", tmp_path / "run", *QUICK_TASKS, *overrides, config=config)


@pytest.fixture(scope="module")
def cotrain_run(tmp_path_factory):
    """The demo model on pairs + train_cls for 4 weighted steps, in-process as from the shell."""
    tmp_path = tmp_path_factory.mktemp("cotrain")
    assert main(_args(tmp_path, _config_file(tmp_path))) == 0
    return tmp_path / "run"


def test_each_task_reports_its_own_terms_routing_and_learning_rate(cotrain_run):
    records = [json.loads(line) for line in (cotrain_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    logged = set().union(*steps)
    for key in ("pairs/contrastive", "pairs/logit_scale", "subgroups/classification", "subgroups/accuracy",
                "subgroups/logit_scale", "subgroups/candidates", "subgroups/local_entropy_text", "grad_norm"):
        assert key in logged, key
    classification = next(r for r in steps if "subgroups/classification" in r)
    assert classification["subgroups/logit_scale"] == pytest.approx(1 / 0.07, rel=0.05)
    assert classification["subgroups/candidates"] == 32  # candidates: all of train_cls's classes
    routing = [r for r in records if "routing_by_task" in r]
    assert routing and set(routing[-1]["routing_by_task"]) <= {"pairs", "subgroups"}
    config = load_config(str(cotrain_run / "config.yaml"))
    schedule = TaskSchedule.from_config(config)
    for record in steps:  # the LR logged after step s is the one for step s: its task's lr_scale applies
        scale = 0.25 if schedule.tasks_at(min(record["step"], 3)) == (1,) else 1.0
        assert record["lr"] == pytest.approx(config.optim.lr * lr_multiplier(record["step"], config) * scale)
    events = EventAccumulator(str(cotrain_run / "tensorboard")).Reload()
    assert {"train/pairs/contrastive", "train/subgroups/classification"} <= set(events.Tags()["scalars"])
    for task, stats in routing[-1]["routing_by_task"].items():  # each task's routing, per layer and modality
        for layer in stats["layers"]:
            tag = f"routing_by_task/{task}/block{layer['block']}/image/routing_success"
            logged = {event.step: event.value for event in events.Scalars(tag)}
            assert logged[routing[-1]["step"]] == pytest.approx(layer["image"]["routing_success"], rel=1e-6), tag


def _steps(workdir: Path) -> list[dict]:
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_killed_run_resumes_its_schedule_and_task_counters_exactly(tmp_path, cotrain_run, monkeypatch):
    killed_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Killed):
        main(_args(tmp_path, _config_file(tmp_path)))
    monkeypatch.undo()
    assert main(_args(tmp_path, _config_file(tmp_path))) == 0
    resumed, uninterrupted = _steps(tmp_path / "run"), _steps(cotrain_run)
    assert [r["step"] for r in resumed] == [2, 4]
    # the same tasks ran in each logging window, and the counters carried over the kill
    def task_terms(records: list[dict]) -> list[list[str]]:
        return [sorted(key for key in record if "/" in key) for record in records]

    assert task_terms(resumed) == task_terms(uninterrupted)
    assert [r["tasks_seen"] for r in resumed] == [r["tasks_seen"] for r in uninterrupted]
    assert resumed[-1]["tasks_seen"] == {"pairs": {"steps": 3, "samples": 24}, "subgroups": {"steps": 1, "samples": 6}}


def test_accumulate_gradient_is_the_sum_of_the_single_task_gradients(tmp_path):
    config = load_config(_config_file(tmp_path, schedule="accumulate", extra={"candidates": 5, "loss_weight": 0.5}),
                         ["model.moe.router_noise=false", "train.device=cpu", "schedule.seed=0",
                          "tasks.1.lr_scale=1.0"])
    engine = build_engine(config, start_session(config))
    generator = torch.Generator().manual_seed(0)
    pairs = TrainBatch(torch.randn(8, 3, 64, 64, generator=generator),
                       torch.randint(1, 999, (8, 16), generator=generator))
    labelled = LabelledBatch(torch.randn(6, 3, 64, 64, generator=generator), torch.tensor([0, 3, 3, 7, 1, 0]))
    names = [f"class {i}" for i in range(9)]
    cpu = torch.device("cpu")
    tasks = [Task(config.tasks[0], itertools.repeat(pairs), cpu),
             ClassificationTask(config.tasks[1], itertools.repeat(labelled), cpu, names,
                                prompt_tokens(names, ["{}", "a {}"], 16), 2, config.schedule.seed)]

    pairs_only, labels_only, both = (_gradients(engine, tasks, runs, config) for runs in ((0,), (1,), (0, 1)))
    assert labels_only["classification.logit_scale"].abs() > 0 and pairs_only["model.logit_scale"].abs() > 0
    for name, gradient in both.items():
        torch.testing.assert_close(gradient, pairs_only[name] + labels_only[name], rtol=1e-4, atol=1e-7, msg=name)


def _gradients(engine, tasks, runs, config) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one co-training step's backward passes (no update)."""
    engine.zero_grad()
    assert task_gradients(engine, tasks, runs, 0, config, 1).stepped
    gradients = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                 for name, p in engine.module.named_parameters()}
    engine.zero_grad()
    return gradients


def test_accumulating_contrastive_tasks_in_micro_batches_sums_their_whole_batch_gradients(tmp_path):
    path = write_config(tmp_path / "two.yaml", {
        "base": "demo", "train": {"steps": 2, "batch_size": 8}, "schedule": {"kind": "accumulate"},
        "tasks": [{"name": "a", "kind": "contrastive", "data": "data_shards/train"},
                  {"name": "b", "kind": "contrastive", "data": "data_shards/train", "loss_weight": 0.5}]})
    overrides = ["model.moe.router_noise=false", "model.moe.group_size=2", "train.device=cpu"]
    whole, micro = (load_config(path, overrides + extra) for extra in ([], ["train.micro_batch_size=4"]))
    generator, cpu = torch.Generator().manual_seed(1), torch.device("cpu")
    batches = [TrainBatch(torch.randn(8, 3, 64, 64, generator=generator),
                          torch.randint(1, 999, (8, 16), generator=generator)) for _ in range(2)]
    engines = {}
    for name, config in (("whole", whole), ("micro", micro)):
        engine = build_engine(config, start_session(config))
        tasks = [Task(task, itertools.repeat(batch), cpu) for task, batch in zip(config.tasks, batches)]
        engines[name] = {runs: _gradients(engine, tasks, runs, config) for runs in ((0,), (1,), (0, 1))}
    for name, gradient in engines["micro"][(0, 1)].items():
        summed = engines["micro"][(0,)][name] + engines["micro"][(1,)][name]
        torch.testing.assert_close(gradient, summed, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(gradient, engines["whole"][(0, 1)][name], rtol=1e-4, atol=1e-6, msg=name)


def _run_workers(outdir: Path, world_size: int) -> list[dict]:
    outdir.mkdir()
    run_processes("tests.training.cotrain_worker", [str(outdir), str(world_size)], world_size, timeout=600)
    return json.loads((outdir / "result.json").read_text())


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cotrain_ep")
    return root, _run_workers(root / "single", 1), _run_workers(root / "parallel", 2)


def test_two_processes_with_expert_parallelism_equal_one_on_a_mixed_schedule(distributed_runs):
    _, single, parallel = distributed_runs
    assert [tuple(s["tasks"]) for s in single] == [tuple(s["tasks"]) for s in parallel]
    assert {tuple(s["tasks"]) for s in single} == {(0,), (1,), (2,), (0, 1, 2)}  # every task, then accumulation
    for one, two in zip(single, parallel):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        # the gathered prompt features' gradients are summed in another order on 2 ranks: rounding of about 1e-5
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=5e-5)


def test_two_processes_end_with_the_parameters_of_one(distributed_runs):
    root, _, _ = distributed_runs
    single, _ = consolidated_state(root / "single")
    parallel, _ = consolidated_state(root / "parallel")
    assert single.keys() == parallel.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(parallel[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("change, message", [
    ({"kind": "regression"}, "'tasks[1].kind' must be one of ['contrastive', 'classification']"),
    ({"cls": "data_shards/heldout"}, "holds no .cls labels"),
])
def test_bad_task_input_is_one_line_and_exit_2(tmp_path, change, message):
    refused(_args(tmp_path, _config_file(tmp_path, **change)), message)


def test_a_label_outside_the_class_list_is_one_line_and_exit_2(tmp_path):
    names = tmp_path / "three.txt"
    names.write_text("arrow\nzodiac\nhousehold\n")
    config = _config_file(tmp_path, schedule="alternating", extra={"classnames": str(names)})
    refused(_args(tmp_path, config), "outside its 3 class names")


def test_micro_batches_with_a_classification_task_are_one_line_and_exit_2(tmp_path):
    refused(_args(tmp_path, _config_file(tmp_path), "train.micro_batch_size=2"),
            "train.micro_batch_size applies to contrastive tasks only")


def test_task_batches_that_do_not_split_over_the_processes_are_one_line_and_exit_2(tmp_path, monkeypatch):
    """As 2 processes would see it (the session's world size is the only input the check reads)."""
    def two_ranks(config):
        return Session(torch.device("cpu"), False, 0, 2)

    monkeypatch.setattr("limoe.train_command.start_session", two_ranks)
    refused(_args(tmp_path, _config_file(tmp_path), "tasks.1.batch_size=5"),
            "task 'subgroups': batch_size 5 does not split over the 2 processes")


def test_a_contrastive_task_batch_of_partial_routing_groups_is_one_line_and_exit_2(tmp_path):
    """Groups of 8 (limoe-tiny): 12 pairs would be spread evenly over ceil(12/8) = 2 groups of 6."""
    refused(_args(tmp_path, _config_file(tmp_path), "tasks.0.batch_size=12"),
            "task 'pairs': batch_size 12 gives 12 examples per GPU, not a multiple of model.moe.group_size 8: they "
            "would be routed in 2 groups of 6. Use a multiple of 8 such as 8 or 16.")
    assert not (tmp_path / "run").exists()


def test_a_cotraining_workdir_resumes_only_with_its_tasks(cotrain_run):
    state = json.loads(next((cotrain_run / "checkpoints").glob("*/state.json")).read_text())
    assert state["objective"] == "co-training"
    refused(["train", "--workdir", str(cotrain_run), "--set", "data.workers=0"],
            "was written by limoe train with tasks:, not limoe train")


def test_pretraining_with_tasks_is_one_line_and_exit_2(tmp_path):
    args = run_args("pretrain", tmp_path / "run", "pretrain.unimodal_steps=2", "pretrain.bimodal_steps=2",
                    "data.workers=0", config=_config_file(tmp_path))
    refused(args, "tasks: co-train the contrastive objective of limoe train")



def test_flip_drops_patches_in_every_task_and_routing_is_kept_per_phase_and_task(tmp_path):
    """Alternating pairs (8 images), subgroups (6): steps 1-2 keep 32 of 64 patches, steps 3-4 all."""
    config = _config_file(tmp_path, schedule="alternating")
    assert main(_args(tmp_path, config, "train.image_mask_ratio=0.5", "train.unmasked_steps=2")) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    routing = {r["stage"]: r for r in records if "routing" in r}
    assert load_config(config).model.num_patches == 64
    expected = {"masked": {"pairs": 8 * 32, "subgroups": 6 * 32}, "unmasked": {"pairs": 8 * 64, "subgroups": 6 * 64}}
    for stage, tasks in expected.items():
        for task, image_tokens in tasks.items():
            layers = routing[stage]["routing_by_task"][task]["layers"]
            assert [layer["image"]["tokens"] for layer in layers] == [image_tokens] * 2, (stage, task)
        assert [layer["image"]["tokens"] for layer in routing[stage]["routing"]["layers"]] == [sum(tasks.values())] * 2
