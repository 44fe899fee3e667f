"""k-NN probe: leave-one-out, similarity-weighted votes, worked by hand."""

import math

import pytest
import torch

from limoe.evaluate.knn import knn_accuracy, knn_predictions


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
