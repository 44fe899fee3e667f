"""What co-training buys on the demo (slow: nine 300-step demo trainings, two at a time, about
28 minutes on two cores; docs/TRAINING.md, "The demo: does it help?", gives the measured numbers).

Equal total steps (300 of batch 128): the demo on pairs alone; PolyViT's weighted schedule over
pairs (240 steps) and train_cls classification (60 steps); and task-by-task with classification
last. Zero-shot top-1 on heldout_cls (classes and images no run has seen) uses the classification
task's templates; retrieval R@5 is the end-of-training report on the held-out pairs. Every number
is a mean over three training seeds: one seed's zero-shot top-1 on the demo moves by more than
five points (5.1% and 10.9% for pairs alone), so a single run cannot tell a gain from luck.
"""

import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from limoe.checkpoints import load_model
from limoe.evaluate import evaluate_zeroshot
from limoe.training.schedules import TaskSchedule
from tests.child_env import child_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COTRAIN = "configs/train/cotrain-demo.yaml"
RUNS = {
    "pairs": ["--config", "demo"],
    "weighted": ["--config", COTRAIN],
    "task_by_task": ["--config", COTRAIN, "--set", "schedule.kind=task_by_task"],  # seed 0: classification last
}
SEEDS = (0, 1, 2)  # train.seed: weights, data order and router noise (the schedule's own seed stays 0)
RETRIEVAL_DROP_LIMIT = 0.03  # the most held-out R@5 co-training may cost
FORGETTING_MARGIN = 0.02  # R@5 task-by-task must lose against weighted, in each direction
# Measured 2026-12-01 (docs/TRAINING.md), means over the three seeds: weighted co-training 6.4% zero-shot
# top-1 against 7.0% for pairs alone, R@5 about 6–7 points lower. That target stays a strict expected
# failure until the demo reaches it.
NOT_YET = pytest.mark.xfail(strict=True, reason="not reached on the demo yet; measured numbers in docs/TRAINING.md")


def _train(name: str, seed: int, workdir: Path) -> Path:
    command = [sys.executable, "-m", "limoe", "train", *RUNS[name], "--set", f"train.seed={seed}",
               "--workdir", str(workdir)]
    subprocess.run(command, cwd=ROOT, env=child_env(OMP_NUM_THREADS="1"), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return workdir


def _measure(workdir: Path) -> dict:
    model, _ = load_model(workdir / "model.safetensors")
    zeroshot = evaluate_zeroshot(model, str(ROOT / "data_shards/heldout_cls"), templates="simple")
    retrieval = json.loads((workdir / "final_metrics.json").read_text())["retrieval"]
    return {"zeroshot_top1": zeroshot["top1"], "zeroshot_top5": zeroshot["top5"],
            **{key: retrieval[key] for key in ("image_to_text_R@5", "text_to_image_R@5")}}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """{run: {metric: mean over SEEDS}}; the trainings run two at a time, one thread each."""
    root = tmp_path_factory.mktemp("gain")
    jobs = [(name, seed) for name in RUNS for seed in SEEDS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        workdirs = list(pool.map(lambda job: _train(*job, root / f"{job[0]}-{job[1]}"), jobs))
    measured = {job: _measure(workdir) for job, workdir in zip(jobs, workdirs)}
    print(json.dumps({f"{name} seed {seed}": metrics for (name, seed), metrics in measured.items()}, indent=1))
    return {name: {metric: statistics.mean(measured[name, seed][metric] for seed in SEEDS)
                   for metric in measured[name, SEEDS[0]]} for name in RUNS}


def test_task_by_task_trains_classification_last():
    from limoe.config import load_config

    schedule = TaskSchedule.from_config(load_config(COTRAIN, ["schedule.kind=task_by_task"]))
    assert schedule.tasks_at(0) == (0,) and schedule.tasks_at(schedule.total - 1) == (1,)


@NOT_YET
def test_weighted_cotraining_raises_zeroshot_and_keeps_retrieval(results):
    pairs, weighted = results["pairs"], results["weighted"]
    assert weighted["zeroshot_top1"] > pairs["zeroshot_top1"]
    for direction in ("image_to_text_R@5", "text_to_image_R@5"):
        assert weighted[direction] >= pairs[direction] - RETRIEVAL_DROP_LIMIT, direction


def test_task_by_task_forgets_retrieval(results):
    """PolyViT's forgetting in miniature: training classification last costs retrieval that the
    weighted schedule keeps (measured: 10.2 points image→text, 5.4 text→image, in the means)."""
    weighted, last = results["weighted"], results["task_by_task"]
    for direction in ("image_to_text_R@5", "text_to_image_R@5"):
        assert last[direction] < weighted[direction] - FORGETTING_MARGIN, direction
