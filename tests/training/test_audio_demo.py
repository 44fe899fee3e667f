"""The audio demo learns (slow: one run of configs/train/audio-demo.yaml, several minutes on two cores).

The emoji pairs and the instrument clips are co-trained in one tower; then, on data_shards/audio_heldout
(64 clips of 32 General MIDI programs the run never heard): audio→text retrieval among the 64
captions, and zero-shot classification of the clips into the 16 instrument families. Chance is
5/64 (7.8%) for R@5 and 1/16 (6.25%) for top-1. The README's audio table (`python -m limoe.figures
record audio-demo`) has the measured numbers; the margins here sit well below them, so a seed's
noise does not fail the test while a run that learned nothing about sounds does.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from limoe.checkpoints import load_model
from limoe.evaluate import evaluate_retrieval, evaluate_zeroshot
from tests.child_env import child_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = str(ROOT / "data_shards" / "audio_heldout")


def test_the_audio_demo_retrieves_and_classifies_unheard_instruments_well_above_chance(tmp_path):
    subprocess.run([sys.executable, "-m", "limoe", "train", "--config", "audio-demo", "--workdir", str(tmp_path)],
                   cwd=ROOT, env=child_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model, _ = load_model(tmp_path / "model.safetensors")
    retrieval = evaluate_retrieval(model, HELDOUT, workers=0, modality="audio")
    zeroshot = evaluate_zeroshot(model, HELDOUT, workers=0, modality="audio")
    assert retrieval["audio_to_text_R@5"] >= 2 * 5 / 64
    assert retrieval["text_to_audio_R@5"] >= 2 * 5 / 64
    assert zeroshot["top1"] >= 1.5 / 16
