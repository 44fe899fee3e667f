"""Where a training process runs: its device, precision, rank and world, decided once at start.

The trainer starts the session and every part of a step that depends on the process layout
(co-training's loaders and schedule among them) reads it from here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from limoe.config import Config
from limoe.distributed import init_process_group, resolve_device
from limoe.errors import LimoeError


@dataclass
class Session:
    """Where this process runs: device, precision, rank and world."""

    device: torch.device
    bf16: bool
    rank: int
    world_size: int


def start_session(config: Config) -> Session:
    """Join (or create) the process group and pick device and precision from the config."""
    cuda = resolve_device(config.train.device, option="train.device") == "cuda"
    rank, world_size, local_rank = init_process_group("nccl" if cuda else "gloo", config.distributed.timeout_minutes)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and cuda)
    if world_size % config.distributed.expert_parallel_size:
        raise LimoeError(
            f"distributed.expert_parallel_size {config.distributed.expert_parallel_size} does not divide the "
            f"{world_size} processes."
        )
    return Session(device, bf16, rank, world_size)
