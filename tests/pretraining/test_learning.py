"""It learns: the demo pretraining on the shipped emoji, measured on data it never saw.

Slow (the demo's 600 steps: minutes on a quiet 2-core machine, a quarter of an hour on a busy
one): masked patches of the held-out emoji end well below predicting zero, masked caption tokens
well above the most frequent token, and the pretrained image tokens beat a random initialisation's
in k-NN on `heldout_cls`. The fast smoke check of the same objective is test_objective.py.
"""

import json

import pytest
import torch

from limoe.checkpoints import load_model
from limoe.cli import main
from limoe.evaluate.knn import evaluate_knn
from limoe.model.tower import Limoe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--workdir", str(workdir)]) == 0
    return workdir


def test_masked_patches_of_held_out_emoji_end_well_below_predicting_zero(pretrained):
    metrics = json.loads((pretrained / "final_metrics.json").read_text())
    for task in ("masked_image", "masked_image_given_text"):
        assert metrics[task]["mse"] < 0.8 * metrics[task]["zero_mse"], metrics[task]


def test_masked_tokens_of_held_out_captions_beat_the_most_frequent_token(pretrained):
    metrics = json.loads((pretrained / "final_metrics.json").read_text())
    for task in ("masked_text", "masked_text_given_image"):
        assert metrics[task]["accuracy"] > metrics[task]["most_frequent_accuracy"] + 0.1, metrics[task]


def test_pretrained_image_tokens_beat_a_random_initialisation_in_knn(pretrained):
    model, config = load_model(pretrained / "model.safetensors")
    torch.manual_seed(config.train.seed)
    fresh = Limoe(config.model)
    pretrained_top1 = evaluate_knn(model, "data_shards/heldout_cls", workers=0)["knn_top1"]
    random_top1 = evaluate_knn(fresh, "data_shards/heldout_cls", workers=0)["knn_top1"]
    assert pretrained_top1 > random_top1 + 0.05, (pretrained_top1, random_top1)
