"""`limoe export` of a run that stopped short of its planned steps: the model card, the message
and the file's metadata name the step the weights were taken at, and the files get the mode the
umask gives every other new file; an image-text-audio model exports with its audio."""

import os
import stat

import pytest
import torch
from safetensors import safe_open

import limoe
from limoe.checkpoints import model_file, store
from limoe.checkpoints import training as checkpoint
from limoe.checkpoints.hub import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
from limoe.config import load_config
from limoe.training.session import start_session
from limoe.training.step import train_step
from limoe.training.trainer import build_engine
from tests.helpers import AUDIO_HELDOUT, run_limoe, shard_members

PLANNED_STEPS = 7


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir of the demo config cut to 7 steps of 8 pairs, with checkpoints at steps 3 and 5
    (the run stopped there)."""
    workdir = tmp_path_factory.mktemp("run")
    config = load_config("demo", ["train.batch_size=8", "train.device=cpu", f"train.steps={PLANNED_STEPS}",
                                  "data.workers=0"])
    engine = build_engine(config, start_session(config))
    images, tokens = torch.randn(8, 3, 64, 64), torch.randint(1, 1000, (8, 16))
    for step in (3, 5):
        train_step(engine, images, tokens, config)
        checkpoint.save_training_checkpoint(engine, workdir, step, config)
    return workdir


def _export(source, output, *options) -> str:
    return run_limoe(["export", "--workdir", str(source), "--output", str(output), *options])


def _stored_step(path) -> str:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()[model_file.STEP_KEY]


def test_an_export_names_the_step_it_took_in_the_card_the_message_and_the_file(run, tmp_path):
    step_3 = run / store.CHECKPOINT_DIR / store.step_dir_name(3)
    message = _export(step_3, tmp_path / "hf", "--format", "hf")
    assert "exported step 3 of" in message
    card = (tmp_path / "hf" / CARD_FILE).read_text()
    assert f"Trained for 3 steps (taken at step 3 of a {PLANNED_STEPS}-step run) of 8 pairs" in card
    assert f"Trained for {PLANNED_STEPS} steps" not in card
    assert _stored_step(tmp_path / "hf" / WEIGHTS_FILE) == "3"

    message = _export(run, tmp_path / "newest.safetensors")  # the workdir: its newest checkpoint
    assert "exported step 5 of" in message
    assert _stored_step(tmp_path / "newest.safetensors") == "5"


def test_exported_files_are_readable_by_others_under_umask_022(run, tmp_path):
    previous = os.umask(0o022)
    try:
        _export(run, tmp_path / "m.safetensors")
        _export(run, tmp_path / "hf", "--format", "hf")
    finally:
        os.umask(previous)
    for path in (tmp_path / "m.safetensors", *(tmp_path / "hf" / name for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE))):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_an_exported_audio_model_encodes_clips_as_the_trained_one_does(tmp_path):
    """A checkpoint of the audio demo's model, exported as a file and as a model folder: both load
    (through open_clip's entry point) to a model whose `encode_audio` gives the trained model's
    features of real clips bit for bit, and the folder's card shows how to encode clips."""
    config = load_config("audio-demo", ["train.batch_size=8", "train.device=cpu", "data.workers=0"])
    engine = build_engine(config, start_session(config))
    checkpoint.save_training_checkpoint(engine, tmp_path / "run", 1, config)
    _export(tmp_path / "run", tmp_path / "audio.safetensors")
    _export(tmp_path / "run", tmp_path / "hf", "--format", "hf")
    assert "limoe.preprocess_audio(" in (tmp_path / "hf" / CARD_FILE).read_text()

    trained = engine.module.model.eval()
    files = list(shard_members(AUDIO_HELDOUT).values())[:5]
    clips = torch.stack([limoe.preprocess_audio(sample["flac"], trained) for sample in files])  # [5, T]
    with torch.no_grad():
        expected = trained.encode_audio(clips)  # [5, D]
        for exported in (tmp_path / "audio.safetensors", tmp_path / "hf"):
            model = limoe.create_model(str(exported))
            assert model.config.modalities == ("image", "text", "audio")
            torch.testing.assert_close(model.encode_audio(clips), expected, rtol=0, atol=0)
