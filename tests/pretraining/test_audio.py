"""`limoe pretrain` on audio (AudioMAE): the masks, the targets and the loss by hand, then a run of
the audio pretraining config on the shipped clips end to end, its resume, and the refusals."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from limoe.cli import main
from limoe.config import load_config
from limoe.data.pipeline import eval_loader, loader_options
from limoe.model.tower import Limoe
from limoe.pretraining.losses import masked_patch_loss, normalized_patches
from limoe.pretraining.objective import MaskedPretraining, task_at
from tests.helpers import AUDIO_HELDOUT, QUICK, TINY_DECODER, metric_records, refused, run_args

CONFIG = "configs/pretrain/audio-demo.yaml"
# The audio demo's model: one-second clips, 128 mel bins x 97 frames → 8 x 6 patches of 16, N = 48.
CLIP_PATCHES = 48
SMALL = [*TINY_DECODER, "pretrain.unimodal_steps=2", "pretrain.bimodal_steps=2", "train.steps=4"]


def _objective(*overrides: str) -> MaskedPretraining:
    config = load_config(CONFIG, [*SMALL, *overrides], kind="pretrain")
    torch.manual_seed(0)
    return MaskedPretraining(Limoe(config.model, config.loss.logit_scale_init), config).eval()


@pytest.fixture(scope="module")
def clips():
    """The first 7 held-out clips (an odd batch) and their captions, as the eval pipeline gives them."""
    model = load_config(CONFIG, kind="pretrain").model
    return next(iter(eval_loader(str(AUDIO_HELDOUT), 7, model.image_size, model.context_length, workers=0,
                                 **loader_options(model, "audio"))))


def test_the_normalised_patch_loss_counts_the_hidden_patches_only_by_hand():
    """Three patches of 4 values, the middle one visible. Each hidden patch normalised: [1, 2, 3, 4]
    has Σ(x − 2.5)² = 5 and unbiased variance 5/3, so its normalised values' mean square is
    (5 / (5/3)) / 4 = 0.75; [0, 0, 0, 8]: Σ(x − 2)² = 48, variance 16, again 0.75. Predicting zero
    costs (0.75 + 0.75) / 2 = 0.75 whatever is predicted for the visible patch (counted, the flat
    visible patch would pull the mean to 0.5)."""
    patches = torch.tensor([[[1.0, 2, 3, 4], [5, 5, 5, 5], [0, 0, 0, 8]]])  # [1, 3, 4]
    hidden = torch.tensor([[True, False, True]])
    target = normalized_patches(patches)
    assert torch.equal(target[0, 1], torch.zeros(4))
    prediction = torch.zeros(1, 3, 4)
    assert masked_patch_loss(prediction, target, hidden).item() == pytest.approx(0.75, rel=1e-5)
    prediction[0, 1] = 100.0  # the visible patch's prediction is not scored
    assert masked_patch_loss(prediction, target, hidden).item() == pytest.approx(0.75, rel=1e-5)
    assert masked_patch_loss(prediction, target, torch.ones(1, 3, dtype=torch.bool)).item() > 100


def test_an_audio_patch_value_is_its_slice_of_the_normalised_log_mel():
    """Tokens run time-major: token 21 of 8 frequency x 6 time patches is time patch 2, frequency patch 5,
    so its values are mel rows 80–95 of frames 32–47, taken time by time (the spectrogram transposed)."""
    embedder = _objective().model.embedders["audio"]
    waveforms = torch.randn(2, 16000)
    features = embedder.features(waveforms)  # [2, 1, 128, 96]
    values = embedder.patch_values(waveforms)  # [2, 48, 256]
    assert features.shape == (2, 1, 128, 96) and values.shape == (2, CLIP_PATCHES, 256)
    torch.testing.assert_close(values[1, 21], features[1, 0, 80:96, 32:48].T.reshape(256), rtol=0, atol=0)


@pytest.mark.parametrize("ratio, kept", [(None, 10), ("0.7", 14)])  # 48 x 0.2 = 9.6 → 10; 48 x 0.3 = 14.4 → 14
def test_masked_audio_keeps_round_1_minus_r_n_patches_per_clip(clips, ratio, kept):
    """Every clip hides exactly N − round(N·(1 − r)) of its 48 patches (AudioMAE's default r = 0.8),
    a different subset per clip; only the kept ones are routed; the loss is the normalised-patch MSE
    over the hidden patches, computed here from the prediction and the targets."""
    objective = _objective(*([f"pretrain.audio_mask_ratio={ratio}"] if ratio else []))
    assert task_at(0, objective.pretrain_config).name == "masked_audio"
    with torch.no_grad():
        out, routing = objective.predict_patches(clips.images, None, step=0)
        loss = objective(clips.images, clips.tokens, step=0).terms["masked_audio_loss"]
    assert out.hidden.shape == (7, CLIP_PATCHES)
    assert out.hidden.sum(dim=1).tolist() == [CLIP_PATCHES - kept] * 7
    assert len({tuple(row.tolist()) for row in out.hidden}) == 7
    assert routing[0].expert.shape == (7, kept)
    errors = ((out.prediction - out.target) ** 2).mean(dim=-1)  # [7, 48]
    by_hand = sum(errors[clip, patch].item() for clip in range(7) for patch in range(CLIP_PATCHES)
                  if out.hidden[clip, patch]) / (7 * (CLIP_PATCHES - kept))
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def _args(workdir: Path, *overrides: str) -> list[str]:
    return run_args("pretrain", workdir, *QUICK, f"data.heldout={AUDIO_HELDOUT}", *SMALL, *overrides, config=CONFIG)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("audio-pretrain")
    assert main(_args(workdir)) == 0
    return workdir


def test_audio_pretraining_trains_each_task_on_clips_and_reports_them(pretrained):
    """16 clips a step: the unimodal stage routes their 10 visible patches each; the bimodal stage's
    masked text is given the whole clips (48 patches). The held-out report masks the 64 clips alike."""
    records = metric_records(pretrained)
    losses = {key: r[key] for r in records for key in r if key.endswith("_loss")}
    assert set(losses) == {"masked_audio_loss", "masked_text_loss", "masked_audio_given_text_loss",
                           "masked_text_given_audio_loss"}
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    routing = {r["stage"]: r["routing"]["layers"][0]["audio"]["tokens"] for r in records if "routing" in r}
    assert routing == {"unimodal": 16 * 10, "bimodal": 16 * 10 + 16 * CLIP_PATCHES}
    final = json.loads((pretrained / "final_metrics.json").read_text())
    assert final["masked_audio"]["patches"] == 64 * (CLIP_PATCHES - 10)
    assert 0 < final["masked_audio"]["zero_mse"] <= 1
    exported = (pretrained / "model.safetensors").is_file()
    state = json.loads((pretrained / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert exported and state["objective"] == "pretraining"


def test_a_killed_audio_pretraining_run_resumes_in_its_stage(pretrained, tmp_path):
    workdir = tmp_path / "killed"
    shutil.copytree(pretrained, workdir)
    shutil.rmtree(workdir / "checkpoints" / "step_00000004")
    (workdir / "model.safetensors").unlink()
    assert main(_args(workdir)) == 0
    assert [r["step"] for r in metric_records(workdir) if "loss" in r] == [2, 4]
    resumed = [r for r in metric_records(workdir) if "loss" in r and r["step"] == 4]
    assert math.isfinite(resumed[0]["masked_audio_given_text_loss"])
    assert (workdir / "model.safetensors").is_file()


@pytest.mark.parametrize("command, config, overrides, message", [
    ("pretrain", None, ["pretrain.modalities=[audio, text]"],
     "pretrain.modalities names 'audio', which is not one of model.modalities (image, text)"),
    ("pretrain", CONFIG, ["pretrain.modalities=[text, audio]"], "pretrain.modalities must name the modality whose"),
    ("train", CONFIG, [], "pretrain.modalities ['audio', 'text'] is for limoe pretrain"),
])
def test_audio_pretraining_settings_that_cannot_run_are_one_line_and_exit_2(tmp_path, command, config, overrides,
                                                                           message):
    refused(run_args(command, tmp_path, *QUICK, *SMALL, *overrides, config=config), message)
    assert not (tmp_path / "checkpoints").exists()
