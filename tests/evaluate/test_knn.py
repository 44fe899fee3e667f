"""k-NN probe: leave-one-out, similarity-weighted votes, worked by hand."""

import math
from pathlib import Path

import pytest
import torch

from limoe.errors import LimoeError
from limoe.evaluate.knn import knn_accuracy, knn_predictions, labelled_samples
from tests.helpers import refused


def _at(degrees: list[float]) -> torch.Tensor:
    """Unit vectors in the plane at these angles: cosine similarity = cos(angle between)."""
    radians = torch.tensor(degrees) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_nearest_neighbour_leaves_the_image_itself_out():
    # a 0° and b 10° are class 0; e 40°, d 80°, c 90° class 1. e's nearest other image is b (30°).
    features, labels = _at([0, 10, 40, 80, 90]), torch.tensor([0, 0, 1, 1, 1])
    assert knn_predictions(features, labels, k=1).tolist() == [0, 0, 0, 1, 1]
    assert knn_accuracy(features, labels, k=1) == pytest.approx(4 / 5)


def test_one_close_neighbour_outvotes_two_far_ones():
    # The query at 0° (class 0): one class-0 image at 8° (cos 0.990) against two class-1 images at
    # 60° and −60° (cos 0.5): exp(0.990/0.07) ≈ 1.4e6 beats 2·exp(0.5/0.07) ≈ 2.5e3; a plain majority would not.
    features, labels = _at([0, 8, 60, -60]), torch.tensor([0, 0, 1, 1])
    assert knn_predictions(features, labels, k=3)[0] == 0


# ---------------------------------------------------------------------------------------------
# k out of range: one line, before anything is loaded or encoded


HELDOUT_CLS = Path(__file__).resolve().parents[2] / "data_shards" / "heldout_cls"  # 331 labelled images


@pytest.mark.parametrize("k, message", [
    ("0", "argument --k: 0 is out of range; give a whole number ≥ 1"),
    ("-1", "argument --k: -1 is out of range; give a whole number ≥ 1"),
    ("331", f"--k 331 is out of range for the 331 labelled images of {HELDOUT_CLS}, each of which has 330 others "
            f"to vote; give 1 ≤ k ≤ 330."),
])
def test_k_out_of_range_is_one_line_before_the_model_is_loaded(k, message):
    """The checkpoint does not exist: the k error comes first, so nothing was loaded or encoded."""
    line = refused(["eval", "knn", "--checkpoint", "/no/such/model", "--data", str(HELDOUT_CLS), "--k", k])
    assert line.startswith(f"limoe: error: {message}")


def test_the_labels_are_counted_without_the_loader():
    assert labelled_samples(str(HELDOUT_CLS)) == 331


@pytest.mark.parametrize("k", [0, 5])
def test_k_outside_one_to_n_minus_one_is_refused_by_the_function_too(k):
    features, labels = _at([0, 10, 40, 80, 90]), torch.tensor([0, 0, 1, 1, 1])
    with pytest.raises(LimoeError, match=f"--k {k} is out of range for the 5 labelled images"):
        knn_predictions(features, labels, k=k)
