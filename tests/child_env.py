"""The environment of a test's child process: this process's, without the launcher variables an
in-process test's one-process group leaves behind (RANK, MASTER_PORT, …). A child given them would
take them for its launcher's and try to join that group, which only this process serves."""

import os

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


def child_env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """os.environ without the launcher variables and `drop`, with `extra` added."""
    removed = set(LAUNCHER_VARIABLES) | set(drop)
    return {**{key: value for key, value in os.environ.items() if key not in removed}, **extra}
