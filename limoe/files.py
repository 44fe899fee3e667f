"""Writing files so that a reader never sees half of one.

Checkpoints, exported models, metrics and reports are written to a temporary name beside their
destination and renamed into place: a crash or a full disk leaves the old file (or none), never
a truncated one.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` then rename onto `path`: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
