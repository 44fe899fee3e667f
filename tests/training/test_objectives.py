"""The objectives as the training loop sees them: names kept in checkpoints, the protocol, the choice."""

import pytest

from limoe.checkpoints import training as checkpoint
from limoe.config import load_config
from limoe.data.pipeline import LocalBatch
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
    assert {"check", "local_batches", "lr_scale", "steps", "stage", "clamp_temperatures"} <= asked
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


def test_the_local_batches_are_each_tasks_share_of_its_batch_with_its_modality(tmp_path):
    assert CoTrainingObjective.local_batches(_with_tasks(tmp_path), 2) == [
        LocalBatch("task 'a' (tasks[].batch_size)", 5, "image"), LocalBatch("task 'b' (tasks[].batch_size)", 3, "image")]
    assert ContrastiveObjective.local_batches(load_config("demo", ["train.batch_size=12"]), 3) == [
        LocalBatch("train.batch_size", 4, "image")]
    audio = CoTrainingObjective.local_batches(load_config("audio-demo", ["train.batch_size=9"]), 3)
    assert audio == [LocalBatch("task 'pairs' (train.batch_size)", 3, "image"),
                     LocalBatch("task 'sounds' (train.batch_size)", 3, "audio")]
