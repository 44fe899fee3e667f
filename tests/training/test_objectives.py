"""The objectives as the training loop sees them: names kept in checkpoints, the protocol, the choice."""

import pytest

from limoe.checkpoints import training as checkpoint
from limoe.config import load_config
from limoe.pretraining.objective import MaskedPretraining
from limoe.training.objectives import ContrastiveObjective, CoTrainingObjective, objective_for
from limoe.training.trainer import Objective

OBJECTIVES = [ContrastiveObjective, CoTrainingObjective, MaskedPretraining]


def test_the_names_written_in_checkpoints_are_unchanged():
    assert [o.name for o in OBJECTIVES] == ["contrastive", "co-training", "pretraining"]
    assert [o.name for o in OBJECTIVES] == [checkpoint.CONTRASTIVE, checkpoint.COTRAINING, checkpoint.PRETRAINING]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.__name__)
def test_every_objective_answers_all_the_loop_asks(objective):
    asked = {name for name in vars(Objective) if not name.startswith("_")} | {"__call__"}
    assert {"check", "largest_local_batch", "lr_scale", "steps", "stage", "clamp_temperatures"} <= asked
    assert [name for name in sorted(asked) if not callable(getattr(objective, name, None))] == []


def _with_tasks(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("base: demo\ntrain: {batch_size: 4}\nschedule: {kind: alternating}\ntasks:\n"
                    "  - {name: a, kind: contrastive, data: data_shards/train, batch_size: 10}\n"
                    "  - {name: b, kind: contrastive, data: data_shards/train, batch_size: 6}\n")
    return load_config(str(path))


def test_limoe_train_co_trains_with_tasks_and_trains_contrastively_without(tmp_path):
    assert objective_for(load_config("demo")) is ContrastiveObjective
    assert objective_for(_with_tasks(tmp_path)) is CoTrainingObjective


def test_the_largest_local_batch_is_the_largest_task_batch_over_the_processes(tmp_path):
    assert CoTrainingObjective.largest_local_batch(_with_tasks(tmp_path), 2) == 5  # max(4, 10, 6) / 2
    assert ContrastiveObjective.largest_local_batch(load_config("demo", ["train.batch_size=12"]), 3) == 4
