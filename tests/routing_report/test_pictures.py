"""The routing pictures, drawn from records made here by hand: each modality's expert shares are
normalised on their own, and the expert map of an example is drawn beside its image, not over it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from limoe.config import Config
from limoe.routing_report.pictures import (LEGEND_PX, balanced_image_share, expert_colors, modality_shares,
                                          plot_patch_experts)
from limoe.routing_report.records import CheckpointRouting, ExampleRouting
from limoe.routing_report.statistics import _layer_statistics, format_summary_table


def _layer(*routed_per_modality: list[int]) -> dict:
    """A layer of an image-text model (two lists) or an image-text-audio one (three)."""
    routed = torch.tensor(routed_per_modality, dtype=torch.float64)  # [M, E]
    names = ("image", "text", "audio")[: len(routed_per_modality)]
    return _layer_statistics(3, names, routed, routed, routed.clone(), torch.zeros(len(names), dtype=torch.float64),
                             slots=1000)


def test_each_modality_is_normalized_over_the_experts_on_its_own():
    # ten times as many image tokens as text tokens, as in a batch of 64 patches and short captions
    shares = modality_shares(_layer([450, 270, 0, 180, 0], [0, 9, 72, 0, 9]))
    assert shares.shape == (2, 5)
    np.testing.assert_allclose(shares, [[0.5, 0.3, 0.0, 0.2, 0.0], [0.0, 0.1, 0.8, 0.0, 0.1]])
    np.testing.assert_allclose(shares.sum(axis=1), [1.0, 1.0])


def test_the_heatmap_weighs_both_modalities_alike():
    # expert 1 gets 30% of the images and 10% of the text: 270 image tokens against 9 text tokens,
    # yet three quarters an image expert; expert 4 gets no tokens at all
    layer = _layer([450, 270, 0, 180, 0, 0], [0, 9, 72, 0, 9, 0])
    np.testing.assert_allclose(balanced_image_share(layer), [1.0, 0.75, 0.0, 1.0, 0.0, np.nan])


def test_a_model_with_audio_has_a_row_and_a_table_column_for_it():
    layer = _layer([3, 0, 1], [0, 2, 0], [0, 0, 4])
    np.testing.assert_allclose(modality_shares(layer), [[0.75, 0, 0.25], [0, 1, 0], [0, 0, 1]])
    # expert 2: a quarter of the images against all the audio → 0.25 / 1.25 an image expert
    np.testing.assert_allclose(balanced_image_share(layer), [1.0, 0.0, 0.2])
    table = format_summary_table({"num_batches": 1, "num_experts": 3, "max_entropy": 1.1, "layers": [layer]})
    assert "tokens img/txt/aud" in table and "4/2/4" in table


def test_a_modality_without_tokens_has_no_shares():
    shares = modality_shares(_layer([3, 0, 4], [0, 0, 0]))
    np.testing.assert_allclose(shares[0], [3 / 7, 0, 4 / 7])
    assert np.isnan(shares[1]).all()


IMAGE_RGB = (255, 153, 0)  # orange, close to the expert colour below
EXPERT = 1  # tab10's orange, (255, 127, 14)


def _report(name: str) -> CheckpointRouting:
    image = np.broadcast_to(np.array(IMAGE_RGB) / 255, (64, 64, 3)).copy()  # [H, W, 3]
    example = ExampleRouting("sample-7", image, torch.full((8, 8), EXPERT), torch.ones(8, 8, dtype=torch.bool),
                             ["<sot>", "<eot>"], [0, 0], [True, True])
    return CheckpointRouting(name, Path(name), Config(), 3, {"num_experts": 4, "layers": []}, [example])


def _columns_of(pixels: np.ndarray, rgb) -> np.ndarray:
    """Columns of the [H, W, 3] picture holding at least 20 pixels of exactly `rgb` (±2)."""
    match = (np.abs(pixels.astype(int) - np.array(rgb)) <= 2).all(axis=-1)  # [H, W]
    return np.nonzero(match.sum(axis=0) >= 20)[0]


@pytest.mark.parametrize("checkpoints", [1, 2])
def test_the_expert_map_is_drawn_beside_the_image_in_its_own_colours(tmp_path, checkpoints):
    path = tmp_path / "patches.png"
    plot_patch_experts([_report(f"c{i}") for i in range(checkpoints)], path)
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB"))[:-LEGEND_PX]  # the panels, not the legend's swatches
    expert_rgb = np.round(expert_colors(4)[EXPERT, :3] * 255)
    image_columns, map_columns = _columns_of(pixels, IMAGE_RGB), _columns_of(pixels, expert_rgb)
    assert len(image_columns) > 100 and len(map_columns) > 100 * checkpoints  # each unblended, panel-sized
    assert image_columns.max() < map_columns.min()  # the image first, the maps to its right: no overlap
