"""Training checkpoints on disk: one directory per step, tensors in safetensors, the rest in JSON.

    workdir/checkpoints/
      latest                             the newest published checkpoint's directory name
      step_00001000/
        state.json                       step, LR schedule, resolved config, the run's shape
        model.rank00000.safetensors      fp32 weights under the unsharded model's names: rank 0
        model.rank00001.safetensors        writes the shared ones, each expert-parallel rank its experts
        optimizer.rank00000.safetensors  Adam moments and step per parameter, same names and writers
        rng.rank00000.safetensors        every process's RNG states
        manifest.json                    written last: format version, size and sha256 of every file

Nothing here is ever unpickled: safetensors holds raw tensors, JSON plain values. A checkpoint is
written into `.step_00001000.partial/` by all processes, each recording its files' checksums;
process 0 then writes the manifest, flushes everything to disk and renames the directory into
place, so a checkpoint directory is either complete or absent. Loading verifies every checksum
and takes the newest complete checkpoint, whatever `latest` says; damaged or incomplete ones are
named in a log line and skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from limoe.checkpoints.legacy import modality_registry_name
from limoe.errors import LimoeError
from limoe.files import atomic_replace, fsync_directory, fsync_file, save_safetensors
from limoe.model.moe import current_parameter_name

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT = "limoe-training-checkpoint"
VERSION = 1
# What state.json holds: the step, the run's own counters, the LR schedule's state, the resolved
# config, and the shape of the run that wrote it.
STATE_KEYS = {"step": int, "progress": dict, "lr_schedule": dict, "config": dict, "processes": int,
              "expert_parallel_size": int, "zero_stage": int}
_STEP_DIR = re.compile(r"step_(\d{8,})")
_TENSOR_FILE = re.compile(r"[a-z]+\.rank\d{5}\.safetensors")
_PARTIAL = re.compile(r"\.step_\d{8,}\.(partial|replaced)")
_CHECKSUMS = "checksums.rank{rank:05d}.json"
_LEGACY_FILES = ("mp_rank_*_model_states.pt", "*_optim_states.pt", "layer_*_expert_*_model_states.pt")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tensor_file_name(kind: str, rank: int) -> str:
    return f"{kind}.rank{rank:05d}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> object:
    """JSON from a file; any failure (missing, unreadable, not UTF-8, not JSON) is a ValueError."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path.name} is unreadable ({type(error).__name__})") from None


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class StoredCheckpoint:
    """A verified checkpoint directory: the files its manifest lists, and its `state.json`."""

    path: Path
    listed: tuple[str, ...]
    state: dict

    @property
    def step(self) -> int:
        return self.state["step"]

    def files(self, kind: str) -> list[Path]:
        """The verified tensor files of one kind (model, optimizer), one per writing process."""
        return [self.path / name for name in sorted(self.listed) if _TENSOR_FILE.fullmatch(name) and
                name.startswith(f"{kind}.")]

    @contextlib.contextmanager
    def entries(self, kind: str) -> Iterator["Entries"]:
        """All tensors of one kind over every writer's file, each read when asked for."""
        with contextlib.ExitStack() as stack:
            handles = {path: stack.enter_context(_open_tensors(path)) for path in self.files(kind)}
            yield Entries(self.path, handles)

    def process_tensors(self, kind: str, rank: int) -> dict[str, torch.Tensor]:
        """One process's own file of `kind` (rng), or {} if the checkpoint has none for it."""
        name = tensor_file_name(kind, rank)
        if name not in self.listed:
            return {}
        with _open_tensors(self.path / name) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}


def _open_tensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise LimoeError(f"checkpoint file {path} is not a readable safetensors file ({error}).") from None


class Entries(Mapping):
    """name → tensor over several safetensors files, each tensor read when asked for.

    A name found in two files, or asked for but absent, is a LimoeError naming the checkpoint:
    the files of one checkpoint partition the names. Names are today's: an entry stored under a
    name from before the experts were stacked (the router's) or before the modality registry
    (`legacy`) is found under its current name.
    """

    def __init__(self, where: Path, handles: dict):
        self.where = where
        self.handles = handles
        self.owner: dict[str, object] = {}
        self.stored_as: dict[str, str] = {}  # current name → the name in the file
        for path, handle in handles.items():
            for stored in handle.keys():
                key = modality_registry_name(current_parameter_name(stored))
                if key in self.owner:
                    raise LimoeError(f"checkpoint {where} holds '{key}' in two files; it is damaged, remove it.")
                self.owner[key], self.stored_as[key] = handle, stored

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.owner:
            raise LimoeError(f"checkpoint {self.where} has no tensor '{key}'; it was written for another model.")
        try:
            return self.owner[key].get_tensor(self.stored_as[key])
        except (SafetensorError, OSError) as error:
            raise LimoeError(f"checkpoint {self.where}: tensor '{key}' cannot be read ({error}).") from None

    def __iter__(self):
        return iter(self.owner)

    def __len__(self) -> int:
        return len(self.owner)


def _verify(path: Path, hash_files: bool = True) -> StoredCheckpoint:
    """The checkpoint at `path` if its manifest is sound and every file matches it, else ValueError
    with the reason, naming the file. `hash_files=False` trusts the checksums (another process has
    just verified them)."""
    if not (path / MANIFEST).is_file():
        legacy = next((p for pattern in _LEGACY_FILES for p in path.glob(pattern)), None)
        if legacy is not None:
            raise ValueError(f"{legacy.name} is in DeepSpeed's pickle format from an earlier limoe, which is never "
                             f"loaded because unpickling a file can run code")
        raise ValueError(f"{MANIFEST} is missing (the checkpoint is incomplete)")
    manifest = _read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST} is not a limoe training checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"format version {manifest.get('version')!r} is not {VERSION}, the one this limoe reads")
    for name, expected in manifest["files"].items():
        file = path / name
        if Path(name).name != name or not isinstance(expected, dict):
            raise ValueError(f"{MANIFEST} lists {name!r}, which is not a file of the checkpoint")
        if not file.is_file():
            raise ValueError(f"{name} is missing")
        if hash_files and (file.stat().st_size != expected.get("bytes") or _sha256(file) != expected.get("sha256")):
            raise ValueError(f"{name} does not match its checksum")
    if STATE not in manifest["files"]:
        raise ValueError(f"{MANIFEST} lists no {STATE}")
    state = _read_json(path / STATE)
    if not isinstance(state, dict):
        raise ValueError(f"{STATE} does not hold a mapping")
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"{STATE} has no {kind.__name__} '{key}'")
    return StoredCheckpoint(path, tuple(manifest["files"]), state)


def open_checkpoint(path: Path, hash_files: bool = True) -> StoredCheckpoint:
    """One checkpoint directory, verified; a damaged one is a LimoeError naming the file."""
    try:
        return _verify(Path(path), hash_files)
    except ValueError as problem:
        raise LimoeError(f"checkpoint {path} cannot be used: {problem}.") from None


def is_checkpoint_directory(path: Path) -> bool:
    """Whether `path` is one checkpoint's directory (rather than a workdir)."""
    return (Path(path) / MANIFEST).is_file() or bool(_STEP_DIR.fullmatch(Path(path).name))


def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def has_checkpoints(workdir: Path) -> bool:
    """Whether `workdir` holds any checkpoint directory, complete or not (nothing is read or hashed)."""
    return bool(_step_dirs(Path(workdir) / CHECKPOINT_DIR))


def newest_complete(workdir: Path) -> Optional[StoredCheckpoint]:
    """The newest checkpoint of `workdir` whose files all match their checksums, or None if the
    workdir has no checkpoint at all. Each damaged or incomplete one passed over is logged in one
    line; if there are checkpoints but none is complete, that is a LimoeError naming the newest."""
    root = Path(workdir) / CHECKPOINT_DIR
    problems = []
    for path in _step_dirs(root):
        try:
            checkpoint = _verify(path)
        except ValueError as problem:
            problems.append((path, problem))
            continue
        for damaged, problem in problems:
            log.warning("checkpoint %s is damaged or incomplete (%s); using %s, the newest complete one",
                        damaged, problem, checkpoint.path.name)
        _warn_if_latest_disagrees(root, checkpoint)
        return checkpoint
    if problems:
        path, problem = problems[0]
        others = f" (and {len(problems) - 1} older ones)" if len(problems) > 1 else ""
        raise LimoeError(f"no complete checkpoint in {root}: {path.name}{others} cannot be used: {problem}; restore "
                         f"the checkpoint from a copy, or move {root} aside to train afresh.")
    return None


def _warn_if_latest_disagrees(root: Path, checkpoint: StoredCheckpoint) -> None:
    """One line when `latest` is missing or names no checkpoint directory at all (a damaged one
    it names has been reported already; an older one means a save ended before moving it)."""
    pointer = root / LATEST
    try:
        named = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        named = None
    if named is None or not _STEP_DIR.fullmatch(named) or not (root / named).is_dir():
        log.warning("%s is missing or names no checkpoint; found %s by scanning", pointer, checkpoint.path.name)


# ---------------------------------------------------------------------------------------------
# Writing


class CheckpointWriter:
    """One process's part of writing a checkpoint into the shared partial directory."""

    def __init__(self, workdir: Path, step: int, rank: int):
        self.root = Path(workdir) / CHECKPOINT_DIR
        self.step = step
        self.rank = rank
        self.partial = self.root / f".{step_dir_name(step)}.partial"
        self.checksums: dict[str, dict] = {}

    def start(self) -> None:
        """Process 0 clears what a killed run may have left and creates the partial directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.iterdir():
            if _PARTIAL.fullmatch(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
        self.partial.mkdir()

    def write_tensors(self, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            self._record(self.partial / tensor_file_name(kind, self.rank),
                         lambda path: save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path))

    def write_json(self, name: str, data: dict) -> None:
        text = json.dumps(data, indent=1, allow_nan=False) + "\n"
        self._record(self.partial / name, lambda path: path.write_text(text, encoding="utf-8"))

    def _record(self, path: Path, write) -> None:
        write(path)
        fsync_file(path)
        self.checksums[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}

    def finish(self) -> None:
        """Record this process's checksums beside its files for process 0 to collect."""
        atomic_replace(self.partial / _CHECKSUMS.format(rank=self.rank),
                       lambda path: path.write_text(json.dumps(self.checksums)))

    def publish(self, processes: int, keep: int) -> Path:
        """Process 0, after every process finished: manifest, rename into place, `latest`, prune."""
        files = {}
        for rank in range(processes):
            part = self.partial / _CHECKSUMS.format(rank=rank)
            files.update(json.loads(part.read_text()))
            part.unlink()
        manifest = {"format": FORMAT, "version": VERSION, "step": self.step, "files": files}
        atomic_replace(self.partial / MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=1)))
        fsync_directory(self.partial)
        final = self.root / step_dir_name(self.step)
        if final.exists():  # a damaged checkpoint of this step, passed over when resuming
            replaced = self.root / f".{final.name}.replaced"
            os.replace(final, replaced)
            shutil.rmtree(replaced)
        os.replace(self.partial, final)
        fsync_directory(self.root)
        atomic_replace(self.root / LATEST, lambda path: path.write_text(final.name + "\n"))
        fsync_directory(self.root)
        _prune(self.root, keep, final)
        return final

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def _prune(root: Path, keep: int, latest: Path) -> None:
    """Keep the newest `keep` (at least 1) checkpoints up to `latest`, never `latest` itself.

    Directories of later steps are what the run passed over when it resumed from an earlier one
    (damaged or incomplete, and named then); the run has gone on from `latest`, so they go."""
    newest_first = _step_dirs(root)
    passed_over = newest_first[:newest_first.index(latest)]
    kept_history = newest_first[newest_first.index(latest):]
    for old in passed_over + kept_history[max(keep, 1):]:
        shutil.rmtree(old, ignore_errors=True)
