"""What co-training buys on the demo (slow: three 300-step demo trainings; docs/TRAINING.md, "The
demo: does it help?", gives the measured numbers).

Equal total steps (300 of batch 128): the demo on pairs alone; PolyViT's weighted schedule over
pairs (240 steps) and train_cls classification (60 steps); and task-by-task with classification
last. Zero-shot top-1 on heldout_cls (classes and images no run has seen) uses the classification
task's templates; retrieval R@5 is the end-of-training report on the held-out pairs.
"""

import json
import subprocess
import sys
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
RETRIEVAL_DROP_LIMIT = 0.03  # the most held-out R@5 co-training may cost
# Measured 2026-12-01 (docs/TRAINING.md): weighted co-training 4.8% zero-shot top-1 against 5.1% for
# pairs alone, R@5 about 10 points lower; task-by-task lost image→text R@5 (37.9% vs 43.1%) but not
# text→image (44.9% vs 44.6%). The targets stay as strict expected failures until the demo reaches them.
NOT_YET = pytest.mark.xfail(strict=True, reason="not reached on the demo yet; measured numbers in docs/TRAINING.md")


def _train(name: str, workdir: Path) -> dict:
    subprocess.run([sys.executable, "-m", "limoe", "train", *RUNS[name], "--workdir", str(workdir)], cwd=ROOT, env=child_env(),
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


@NOT_YET
def test_weighted_cotraining_raises_zeroshot_and_keeps_retrieval(results):
    pairs, weighted = results["pairs"], results["weighted"]
    assert weighted["zeroshot_top1"] > pairs["zeroshot_top1"]
    for direction in ("image_to_text_R@5", "text_to_image_R@5"):
        assert weighted[direction] >= pairs[direction] - RETRIEVAL_DROP_LIMIT, direction


@NOT_YET
def test_task_by_task_forgets_retrieval(results):
    weighted, last = results["weighted"], results["task_by_task"]
    for direction in ("image_to_text_R@5", "text_to_image_R@5"):
        assert last[direction] < weighted[direction], direction
