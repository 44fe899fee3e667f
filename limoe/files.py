"""Writing files so that a reader never sees half of one, and failing early when we cannot.

Checkpoints, exported models, metrics and reports are written to a temporary name beside their
destination, flushed to disk and renamed into place: a crash or a full disk leaves the old file
(or none), never a truncated one, and a failed write removes its temporary file. Output locations
are checked before the work that fills them starts, so an hour of evaluation is not lost to a
read-only folder or a typo.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Optional

from limoe.errors import LimoeError

# The errors that mean "this location cannot take the file", as opposed to a bug.
_UNWRITABLE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def describe_os_error(error: OSError) -> str:
    """A short reason for an OSError from writing: 'the disk is full', or the system's message."""
    return _UNWRITABLE.get(error.errno) or error.strerror or str(error)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, flush it to disk and rename onto `path`; on failure the temporary
    file is removed and an OSError becomes a LimoeError naming `path`."""
    try:
        atomic_replace(path, write)
    except OSError as error:
        raise LimoeError(f"could not write {path}: {describe_os_error(error)}; free some space or choose a "
                         f"writable location.") from None


def atomic_replace(path: Path, write: Callable[[Path], object]) -> None:
    """`atomic_write` for callers that handle the OSError themselves (checkpoints, which must tell
    every process)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    """safetensors' `save_file`, with its I/O failures raised as OSError (it has its own error
    type, whose message carries the system's error number)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
    # safetensors creates its file private (0600); give it the mode any other new file gets, so
    # colleagues and upload tools running as another user can read an exported model.
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk (a rename is only durable after its data is)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (a rename into it, a new file) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems that cannot sync a folder
            raise
    finally:
        os.close(descriptor)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _check_writable_directory(folder: Path, option: str, target: Path) -> None:
    """Create and delete a probe file in `folder`: the only test that also holds for root and for
    read-only mounts (permission bits alone say neither)."""
    if not folder.is_dir():
        raise LimoeError(f"{option} {target}: {folder} is not a directory; choose another location.")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".limoe-probe-", dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise LimoeError(f"{option} {target}: cannot write in {folder} ({describe_os_error(error)}); "
                         f"choose a writable location.") from None


def check_output_file(path: str | Path, option: str) -> Path:
    """The output file `path` as a Path, after checking it can be written (before any work)."""
    if not str(path).strip():
        raise LimoeError(f"{option} is empty; give the path of the file to write.")
    path = Path(path)
    if path.is_dir():
        raise LimoeError(f"{option} {path} is a directory; give a file path such as {path / 'out'}.")
    _check_writable_directory(_nearest_existing(path.parent), option, path)
    return path


def check_output_directory(path: str | Path, option: str) -> Path:
    """The output folder `path` as a Path, after checking it can be created or written in."""
    if not str(path).strip():
        raise LimoeError(f"{option} is empty; give the folder to write into.")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LimoeError(f"{option} {path} is a file, not a folder; give a folder path.")
    _check_writable_directory(_nearest_existing(path), option, path)
    return path
