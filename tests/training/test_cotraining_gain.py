"""What co-training buys on the demo (slow: three 300-step demo trainings; docs/TRAINING.md, "The
demo: does it help?", says what has been measured).

Equal total steps (300 of batch 128): the demo on pairs alone; PolyViT's weighted schedule over
pairs (240 steps) and train_cls classification (60 steps); and task-by-task with classification
last. Zero-shot top-1 on heldout_cls (classes and images no run has seen) uses the classification
task's templates; retrieval R@5 is the end-of-training report on the held-out pairs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from limoe.checkpoints import load_model
from limoe.evaluate import evaluate_zeroshot
from limoe.training.schedules import TaskSchedule

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COTRAIN = "configs/train/cotrain-demo.yaml"
RUNS = {
    "pairs": ["--config", "demo"],
    "weighted": ["--config", COTRAIN],
    "task_by_task": ["--config", COTRAIN, "--set", "schedule.kind=task_by_task"],  # seed 0: classification last
}
# The issue's own bound on the retrieval cost. The zero-shot gain and the forgetting are asserted as
# strict improvements until the three runs have been measured; then their measured margins go here.
RETRIEVAL_DROP_LIMIT = 0.03


def _train(name: str, workdir: Path) -> dict:
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}  # a fresh single-process run
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    subprocess.run([sys.executable, "-m", "limoe", "train", *RUNS[name], "--workdir", str(workdir)], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model, _ = load_model(workdir / "model.safetensors")
    zeroshot = evaluate_zeroshot(model, str(ROOT / "data_shards/heldout_cls"), templates="simple")
    retrieval = json.loads((workdir / "final_metrics.json").read_text())["retrieval"]
    return {"zeroshot_top1": zeroshot["top1"], "zeroshot_top5": zeroshot["top5"],
            **{key: retrieval[key] for key in ("image_to_text_R@5", "text_to_image_R@5")}}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gain")
    measured = {name: _train(name, root / name) for name in RUNS}
    print(json.dumps(measured, indent=1))
    return measured


def test_task_by_task_trains_classification_last():
    from limoe.config import load_config

    schedule = TaskSchedule.from_config(load_config(COTRAIN, ["schedule.kind=task_by_task"]))
    assert schedule.tasks_at(0) == (0,) and schedule.tasks_at(schedule.total - 1) == (1,)


def test_weighted_cotraining_raises_zeroshot_and_keeps_retrieval(results):
    pairs, weighted = results["pairs"], results["weighted"]
    assert weighted["zeroshot_top1"] > pairs["zeroshot_top1"]
    for direction in ("image_to_text_R@5", "text_to_image_R@5"):
        assert weighted[direction] >= pairs[direction] - RETRIEVAL_DROP_LIMIT, direction


def test_task_by_task_forgets_retrieval(results):
    weighted, last = results["weighted"], results["task_by_task"]
    for direction in ("image_to_text_R@5", "text_to_image_R@5"):
        assert last[direction] < weighted[direction], direction
