"""The command that launches a planned run, for `limoe plan` to print and the user to paste."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

GPUS_PER_NODE = 8  # beyond this many GPUs the launch line spreads the run over nodes


def nodes_for(gpus: int) -> int:
    """Nodes of equal GPU counts, at most GPUS_PER_NODE each, that hold `gpus` GPUs: as few as can."""
    return next(n for n in range(-(-gpus // GPUS_PER_NODE), gpus + 1) if gpus % n == 0)


def launch_command(config_name: str, gpus: int, overrides: Sequence[str]) -> str:
    """The shell command that starts the planned run on `gpus` GPUs with `overrides` (`--set`):
    `limoe train` for one GPU, DeepSpeed's launcher on one node of up to GPUS_PER_NODE, and over a
    hostfile `hosts` of equal nodes beyond that; the workdir is named after the config."""
    train = ["train", "--config", config_name, "--workdir", f"runs/{Path(config_name).stem}"]
    train += [part for override in overrides for part in ("--set", override)]
    if gpus == 1:
        return shlex.join(["limoe", *train])
    if gpus <= GPUS_PER_NODE:
        return shlex.join(["deepspeed", "--num_gpus", str(gpus), "--module", "limoe", *train])
    nodes = nodes_for(gpus)
    return shlex.join(["deepspeed", "--hostfile", "hosts", "--num_nodes", str(nodes), "--num_gpus", str(gpus // nodes),
                       "--module", "limoe", *train])
