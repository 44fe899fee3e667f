"""A training workdir belongs to one run at a time and to one architecture.

- `locked_workdir`: process 0 holds an exclusive `flock` on `workdir/train.lock` while training,
  with its pid and host written inside; a second `limoe train` on the same workdir refuses in one
  line naming them. The kernel drops the lock when the process ends, however it ends, so a killed
  run never leaves a stale lock behind. Neither the lock nor `metrics.jsonl` may be a symbolic
  link: the run's writes stay inside its workdir.
- `check_same_architecture`: a workdir's checkpoints are resumed only by the model they hold;
  settings that do not change the weights (kernel backend, capacity factors, the name) may change.
- `keep_metrics_until`: after a kill, `metrics.jsonl` may hold steps logged after the checkpoint
  the run resumes from; those are dropped before they are logged again, so each step appears once.
- `evaluated_steps`: the steps `metrics.jsonl` holds an evaluation record of, so a resumed run can
  tell whether its checkpoint's evaluation was written before the kill.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator, Optional

from limoe.config import ModelConfig, to_dict
from limoe.distributed import any_process
from limoe.errors import LimoeError
from limoe.files import atomic_write, describe_os_error, open_for_append, refuse_link

LOCK = "train.lock"
METRICS = "metrics.jsonl"
# Model keys that choose how the same weights are computed or evaluated, not which weights exist.
NOT_ARCHITECTURE = ("name", "moe.backend", "moe.train_capacity_factor", "moe.eval_capacity_factor")


@contextlib.contextmanager
def locked_workdir(workdir: Path, rank: int) -> Iterator[None]:
    """Create `workdir` and hold its lock (process 0) for the duration; every process calls, and
    every process raises the same way when the workdir is taken or cannot be written."""
    handle, problem = None, None
    if rank == 0:
        try:
            handle = _lock(workdir)
        except LimoeError as error:
            problem = error
    if any_process(problem is not None):
        raise problem or LimoeError(f"process 0 could not take {workdir}; see its message.")
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing the file releases the lock


def _lock(workdir: Path):
    lock = Path(workdir) / LOCK
    refuse_link(Path(workdir) / METRICS)  # appended to by the run (limoe.training.progress)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open_for_append(lock, "a+")
    except OSError as error:
        raise LimoeError(f"cannot write in workdir {workdir} ({describe_os_error(error)}); give a writable "
                         f"--workdir.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LimoeError(f"workdir {workdir} is in use by {holder}; wait for that run to end, stop it, or give "
                         f"another --workdir.") from None
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.truncate(0)
    handle.write(f"limoe train (pid {os.getpid()} on host {socket.gethostname()}, since {started})\n")
    handle.flush()
    return handle


def _differences(saved: dict, wanted: dict, path: str = "") -> Iterator[tuple[str, object, object]]:
    for key in saved.keys() | wanted.keys():
        dotted = f"{path}{key}"
        if isinstance(saved.get(key), dict) and isinstance(wanted.get(key), dict):
            yield from _differences(saved[key], wanted[key], f"{dotted}.")
        elif saved.get(key) != wanted.get(key) and dotted not in NOT_ARCHITECTURE:
            yield dotted, saved.get(key), wanted.get(key)


def check_same_architecture(saved: ModelConfig, wanted: ModelConfig, checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` (trained as `saved`) as a model of another architecture."""
    differences = sorted(_differences(to_dict(saved), to_dict(wanted)))
    if differences:
        key, before, after = differences[0]
        more = f" (and {len(differences) - 1} more keys)" if len(differences) > 1 else ""
        raise LimoeError(
            f"{checkpoint} holds a checkpoint of a different architecture: model.{key} is {before!r} there and "
            f"{after!r} now{more}; use a new --workdir or the same model config."
        )


def keep_metrics_until(workdir: Path, step: int) -> None:
    """Drop `metrics.jsonl` records after `step` (and a line cut short by a kill), in place."""
    path = Path(workdir) / METRICS
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if (record := _record(line)) is not None and record["step"] <= step]
    if kept != lines:
        atomic_write(path, lambda tmp: tmp.write_bytes(b"".join(kept)))


def evaluated_steps(workdir: Path) -> set[int]:
    """The steps whose evaluation during training `metrics.jsonl` records (whole lines only)."""
    path = Path(workdir) / METRICS
    if not path.is_file():
        return set()
    records = (_record(line) for line in path.read_bytes().splitlines(keepends=True))
    return {record["step"] for record in records if record is not None and "eval" in record}


def _record(line: bytes) -> Optional[dict]:
    """One metrics line as a record with an integer step, or None for a line that is not a whole record."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None
