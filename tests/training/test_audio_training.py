"""Training on audio: a co-training task of audio–text pairs (or labelled clips) encodes its clips
and captions through the tower together and contrasts them, micro-batches included, end to end."""

import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from limoe.cli import main
from limoe.config import load_config
from limoe.training.flip import PatchDropping
from limoe.training.losses import auxiliary_loss
from limoe.training.session import start_session
from limoe.training.step import forward_backward
from limoe.training.trainer import build_engine
from tests.helpers import QUICK_TASKS, ROOT, Killed, killed_after_checkpoint, refused, run_args, write_config

BATCH = 12  # three routing groups of 4, three micro-batches of 4
AUDIO_TEXT = ("audio", "text")
ENGINE = [f"train.batch_size={BATCH}", "train.device=cpu", "model.moe.group_size=4", "optim.warmup_steps=1",
          "model.moe.router_noise=false", "data.workers=0"]


@pytest.fixture(scope="module")
def engine():
    """The audio demo's model (image, text and audio) in an engine whose routers add no noise, so the
    whole batch and its micro-batches route alike."""
    config = load_config("audio-demo", ENGINE)
    return build_engine(config, start_session(config))


def _clips_and_captions(config) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH seeded clips [B, T] float32 of the model's length, and captions [B, L] of 8 tokens."""
    generator = torch.Generator().manual_seed(5)
    clips = 0.3 * torch.randn(BATCH, config.model.audio.clip_samples, generator=generator)
    tokens = torch.randint(1, 1000, (BATCH, config.model.context_length), generator=generator)
    tokens[:, 9:] = 0
    return clips, tokens


def _gradients(engine, overrides: list[str]) -> tuple[dict, dict]:
    config = load_config("audio-demo", ENGINE + overrides)
    engine.zero_grad()
    terms, _, _ = forward_backward(engine, *_clips_and_captions(config), config, modalities=AUDIO_TEXT)
    return {name: p.grad.clone() for name, p in engine.module.named_parameters() if p.grad is not None}, terms


def test_an_audio_task_step_is_the_clip_loss_of_its_clips_and_captions_encoded_together(engine):
    config = load_config("audio-demo", ENGINE)
    gradients, terms = _gradients(engine, [])
    model = engine.module.model
    clips, tokens = _clips_and_captions(config)
    with torch.no_grad():  # by hand: both sides through the tower together, then symmetric InfoNCE
        features, routing = model.encode({"audio": clips, "text": tokens})
        logits = model.logit_scale.exp() * features["audio"] @ features["text"].T  # [B, B]
        targets = torch.arange(BATCH)
        clip_loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        aux, _ = auxiliary_loss(routing, config.loss, clips.device)
    torch.testing.assert_close(terms["contrastive"], clip_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["loss"], clip_loss + aux, rtol=1e-6, atol=1e-6)
    assert gradients["model.embedders.audio.patch_embed.weight"].abs().sum() > 0
    images = [grad for name, grad in gradients.items() if "image" in name]  # its embedder, positions, pool, head
    assert images and all(grad.abs().sum() == 0 for grad in images)  # no image went in


def test_audio_micro_batches_give_the_whole_batch_gradient(engine):
    whole, whole_terms = _gradients(engine, [])
    micro, micro_terms = _gradients(engine, ["train.micro_batch_size=4"])
    assert micro.keys() == whole.keys()
    for name, grad in whole.items():  # fp32: summing in another order changes the last digits
        torch.testing.assert_close(micro[name], grad, rtol=0, atol=1e-5 * grad.abs().max().item(), msg=name)
    for name, value in whole_terms.items():
        torch.testing.assert_close(micro_terms[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_audio_masking_micro_batches_give_the_whole_batch_gradient_of_the_same_masks(engine):
    """train.audio_mask_ratio draws each clip's kept patches once per step for the whole batch; each
    micro-batch encodes its own rows of them in both passes of the feature cache."""
    masking = ["train.audio_mask_ratio=0.5"]
    unmasked, _ = _gradients(engine, [])
    unmasking = engine.module.patch_dropping
    engine.module.patch_dropping = {**unmasking, "audio": PatchDropping.from_config(
        load_config("audio-demo", ENGINE + masking), "audio")}
    try:
        whole, whole_terms = _gradients(engine, masking)
        micro, micro_terms = _gradients(engine, masking + ["train.micro_batch_size=4"])
    finally:
        engine.module.patch_dropping = unmasking
    for name, grad in whole.items():
        torch.testing.assert_close(micro[name], grad, rtol=0, atol=1e-5 * grad.abs().max().item(), msg=name)
    torch.testing.assert_close(micro_terms["loss"], whole_terms["loss"], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(whole["model.audio_positions"], unmasked["model.audio_positions"])  # masking acted


def _shard_with_a_corrupt_clip(folder: Path) -> str:
    """Five clips of data_shards/audio_train and one whose FLAC is garbage, as one shard."""
    folder.mkdir()
    with tarfile.open(ROOT / "data_shards/audio_train/00000.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()][:10]  # KEY.flac and KEY.json of five clips
        samples: dict[str, dict] = {}
        for member in members:
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[extension] = tar.extractfile(member).read()
    samples["corrupt"] = {"__key__": "corrupt", "flac": b"fLaC" + bytes(range(256)) * 3,
                          "json": json.dumps({"text": ["a broken clip"]}).encode()}
    with wds.TarWriter(str(folder / "00000.tar")) as writer:
        for sample in samples.values():
            writer.write(sample)
    return str(folder)


def _config(tmp_path: Path, sounds: str) -> str:
    """The audio demo on emoji pairs, audio pairs and instrument families: 5 weighted steps."""
    return write_config(tmp_path / "audio.yaml", {
        "base": "audio-demo",
        "train": {"steps": 5},
        "tasks": [
            {"name": "pairs", "kind": "contrastive", "data": "data_shards/train", "batch_size": 8, "steps": 2},
            {"name": "sounds", "kind": "contrastive", "data": sounds, "modalities": ["audio", "text"],
             "batch_size": 8, "steps": 2},
            {"name": "families", "kind": "classification", "data": "data_shards/audio_heldout",
             "modalities": ["audio", "text"], "batch_size": 6, "steps": 1},
        ],
    })


def test_cotraining_on_images_audio_and_instrument_families_trains_resumes_and_counts_bad_clips(tmp_path,
                                                                                                 monkeypatch):
    config = _config(tmp_path, _shard_with_a_corrupt_clip(tmp_path / "sounds"))
    args = run_args("train", tmp_path / "run", *QUICK_TASKS, config=config)
    killed_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Killed):
        main(args)
    monkeypatch.undo()
    assert main(args) == 0

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 5]
    assert steps[-1]["tasks_seen"] == {"pairs": {"steps": 2, "samples": 16}, "sounds": {"steps": 2, "samples": 16},
                                       "families": {"steps": 1, "samples": 6}}
    logged = set().union(*steps)
    assert {"sounds/contrastive", "families/classification", "families/accuracy"} <= logged
    families = next(r for r in steps if "families/candidates" in r)
    assert families["families/candidates"] == 16  # audio_heldout's instrument families
    assert any(r["routing_success_audio"] is not None for r in steps)  # the audio tasks' clips were routed
    sounds = [layer for r in records if "routing_by_task" in r for layer in r["routing_by_task"]["sounds"]["layers"]]
    assert sounds and all(layer["audio"]["tokens"] > 0 and layer["image"]["tokens"] == 0 for layer in sounds)
    assert steps[-1]["bad_samples"].get("bad_audio", 0) >= 1  # the corrupt clip was read, counted and skipped
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"step_00000004", "step_00000005"}  # the newest kept
    assert (run / "model.safetensors").exists()


@pytest.mark.parametrize("modalities", [["text", "audio"], ["audio", "image"]])
def test_a_task_of_modalities_training_cannot_read_is_one_line_and_exit_2(tmp_path, modalities):
    config = write_config(tmp_path / "bad.yaml", {
        "base": "audio-demo", "train": {"steps": 1},
        "tasks": [{"name": "sounds", "kind": "contrastive", "data": "data_shards/audio_train",
                   "modalities": modalities, "steps": 1}]})
    refused(run_args("train", tmp_path / "run", *QUICK_TASKS, config=config), "task 'sounds'", "cannot be trained",
            "[audio, text]")


def test_a_task_logs_no_routing_terms_of_a_modality_it_does_not_feed(tmp_path):
    """The audio demo's two tasks, one step each: the image–text task logs image and text entropy
    terms, the audio–text task audio and text ones; neither logs a term of the modality it lacks
    (it would be a 0 that says nothing about routing), in metrics.jsonl or TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path / "audio.yaml", {
        "base": "audio-demo", "train": {"steps": 2},
        "tasks": [{"name": "pairs", "kind": "contrastive", "data": "data_shards/train", "batch_size": 8, "steps": 1},
                  {"name": "sounds", "kind": "contrastive", "data": "data_shards/audio_train",
                   "modalities": ["audio", "text"], "batch_size": 8, "steps": 1}]})
    run = tmp_path / "run"
    assert main(run_args("train", run, *QUICK_TASKS, "train.log_every=1", config=config)) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*(record for record in records if "loss" in record))
    tags = set(EventAccumulator(str(run / "tensorboard")).Reload().Tags()["scalars"])
    for task, fed, lacking in (("pairs", ("image", "text"), "audio"), ("sounds", ("audio", "text"), "image")):
        for term in ("local_entropy", "global_entropy"):
            assert {f"{task}/{term}_{name}" for name in fed} <= logged, task
            assert {f"train/{task}/{term}_{name}" for name in fed} <= tags, task
            assert f"{task}/{term}_{lacking}" not in logged and f"train/{task}/{term}_{lacking}" not in tags
    sounds = next(record for record in records if "sounds/local_entropy_audio" in record)
    assert sounds["sounds/local_entropy_audio"] > 0  # the clips' tokens were routed and their entropy counted


def test_limoe_train_sizes_an_audio_tasks_batches_by_their_clips(tmp_path, monkeypatch):
    """The audio demo at 16 pairs per task, no data workers (2 batches in flight per loader): the
    emoji task's 64 px images take 2 x 16 x 3 x 64^2 B = 0.375 MiB, the sounds task's one-second
    clips 2 x 16 x 16000 x 4 B = 1.95 MiB. A 2 MiB machine holds the images (all the old check
    counted, as if the clips were images too) but not both: the run is refused before it starts."""
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 2 * 2**20 // 4096 if name == "SC_PHYS_PAGES" else
                        4096 if name == "SC_PAGE_SIZE" else real(name))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    run = tmp_path / "run"
    refused(run_args("train", run, *QUICK_TASKS, "train.batch_size=16", config="audio-demo"),
            "task 'sounds' (train.batch_size) gives 16 pairs per process", "clips and images alone need 0.00227 GiB")
    assert not run.exists()
