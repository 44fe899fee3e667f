"""A run's training loaders come from its config, seeded from (train.seed, the step it starts at,
the task): a run resumed at a step reads what earlier releases' resumed runs read there."""

import torch

from limoe.config import load_config
from limoe.data.pipeline import train_loader
from limoe.training.loaders import resume_seed, train_loader_for

CPU = torch.device("cpu")


def test_the_resume_seed_is_the_one_earlier_releases_used():
    assert resume_seed(5, 0) == 5
    assert resume_seed(5, 3) == 3_000_014  # 5 + 3 · 1 000 003
    assert resume_seed(5, 3, stream=2) == 3_015_852  # ... + 2 · 7 919


def test_a_task_loader_resumed_at_a_step_draws_the_batches_of_its_hand_computed_seed():
    config = load_config("demo", ["data.workers=0", "data.resize_on=worker", "train.seed=5"])
    data = config.data
    by_hand = train_loader(data.train, 3, config.model.image_size, config.model.context_length, 0,
                           data.shuffle_buffer, data.resampled, seed=3_015_852, max_bad_fraction=data.max_bad_fraction)
    resumed = train_loader_for(config, data.train, 6, 2, CPU, 3, stream=2)  # global batch 6 over 2 processes
    later = train_loader_for(config, data.train, 6, 2, CPU, 4, stream=2)
    expected, got, other = (next(iter(loader)) for loader in (by_hand, resumed, later))
    assert got.tokens.shape[0] == 3
    assert torch.equal(got.tokens, expected.tokens)  # the same pairs (their random crops are not the seed's)
    assert not torch.equal(other.tokens, got.tokens)  # the seed decides what is drawn


def test_a_run_decoding_on_the_device_trains_on_the_images_a_worker_decode_gives():
    """data.decode_on reaches the run's loader: its batches carry the encoded files, and on the
    device they become the crops the worker-decoded run gets (the demo's 64 px JPEGs decode at full
    scale either way, so bit for bit). Without data workers the boxes come from torch's global
    generator, seeded alike for both."""
    from limoe.data.crops import Uncropped
    from limoe.training.device_batches import DeviceBatches

    batches = {}
    for decode_on in ("worker", "device"):
        config = load_config("demo", ["data.workers=0", "data.resize_on=device", f"data.decode_on={decode_on}"])
        loader = train_loader_for(config, config.data.train, 4, 1, CPU, 0)
        raw = next(iter(loader))
        assert isinstance(raw.images, Uncropped) and (raw.images.encoded is not None) == (decode_on == "device")
        torch.manual_seed(0)
        batches[decode_on] = next(iter(DeviceBatches(loader, CPU)))
    assert torch.equal(batches["device"][0], batches["worker"][0])
    assert torch.equal(batches["device"][1], batches["worker"][1])
