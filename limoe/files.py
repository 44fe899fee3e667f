"""Writing files so that a reader never sees half of one, and failing early when we cannot.

Checkpoints, exported models, metrics and reports are written to a temporary name beside their
destination, flushed to disk and renamed into place: a crash or a full disk leaves the old file
(or none), never a truncated one, and a failed write removes its temporary file; the temporary
files a killed process left for the same destination are removed by the next write. Output
locations are checked before the work that fills them starts, so an hour of evaluation is not lost
to a read-only folder or a typo, and an output that would replace something the command reads is
refused then too. Text files a user hands in are read by one function, so each one that is not
UTF-8 text is the same one-line error.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

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
    tmp = path.with_name(f"{_temporary_prefix(path)}{socket.gethostname()}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of `path` left by writers on this host that no longer run
    (killed mid-write); returns them. A temporary file is named after its writer's host and pid:
    one whose process is alive (or may be: another user's, or a new process that reuses the pid)
    is kept, whatever its age, as is one written on another host sharing the folder, whose
    processes cannot be seen from here. Names with a pid alone, from before hosts were named, are
    taken as this host's."""
    prefix, host, removed = _temporary_prefix(path), socket.gethostname(), []
    for candidate in path.parent.glob(f"{glob.escape(prefix)}*"):
        writer_host, _, pid = candidate.name[len(prefix):].rpartition("-")
        if writer_host in (host, "") and pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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
    """The process's umask. Linux reports it in /proc/self/status; elsewhere reading it means setting
    it and putting it straight back, which for that instant applies to every thread of the process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
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


PathLike = Union[str, Path]


def refuse_overwriting_inputs(outputs: Mapping[str, Optional[PathLike]], inputs: Iterable[Optional[PathLike]]) -> None:
    """Refuse, before any work, an output that is, or lies inside, something the command reads
    (`inputs`: files and folders; missing ones and None are skipped), or that is the same file
    as another output. `outputs` maps each option to its path (None: not given). Paths are
    compared with symbolic links followed, and existing files also by identity (hard links), so
    no spelling of a path gets past."""
    sources = [(Path(source), Path(source).resolve()) for source in inputs
               if source is not None and str(source).strip() and Path(source).exists()]
    written: list[tuple[str, Path, Path]] = []
    for option, output in outputs.items():
        if output is None:
            continue
        target = Path(output).resolve()
        for given, source in sources:
            if _same_path(target, source):
                which = "" if str(given) == str(output) else f" {given},"
                raise LimoeError(f"{option} {output} is{which} an input of this command; write the output to another "
                                 f"path.")
            if source in target.parents:
                raise LimoeError(f"{option} {output} lies inside {given}, an input of this command; write the output "
                                 f"outside it.")
        for other_option, other, other_target in written:
            if _same_path(target, other_target):
                raise LimoeError(f"{option} {output} is the same file as {other_option} {other}; give each output "
                                 f"its own path.")
        written.append((option, Path(output), target))


def _same_path(a: Path, b: Path) -> bool:
    return a == b or (a.exists() and b.exists() and os.path.samefile(a, b))


def read_text_file(path: PathLike, what: str) -> str:
    """The text of the file `path` (`what` it is, for messages: "config file", "class names
    file"), which must be UTF-8 (a byte-order mark is dropped): a folder, a missing or
    unreadable file, or other bytes are one line naming the file."""
    path = Path(path)
    if path.is_dir():
        raise LimoeError(f"{what} {path} is a folder; give the path of a file.")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LimoeError(f"{what} {path} does not exist; check the path.") from None
    except OSError as error:
        raise LimoeError(f"cannot read {what} {path} ({error.strerror or error}); check the path and its "
                         f"permissions.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LimoeError(f"{what} {path} must be UTF-8 text, but byte {error.start} is not; save it as "
                         f"UTF-8.") from None


def open_for_append(path: Path, mode: str = "a"):
    """`open(path, mode)` for a file inside a folder the command owns (a workdir's lock, its
    metrics), created if missing, without following a symbolic link there (see `refuse_link`)."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            refuse_link(path)
        raise
    return os.fdopen(descriptor, mode, encoding="utf-8")


def refuse_link(path: Path) -> None:
    """A file limoe appends to inside a folder it was given must not be a symbolic link: the
    write would land wherever the link points, outside the folder."""
    if Path(path).is_symlink():
        raise LimoeError(f"{path} is a symbolic link; limoe writes only inside the folder it was given, so remove "
                         f"the link.")
