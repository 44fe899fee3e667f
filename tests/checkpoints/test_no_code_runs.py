"""Loading never runs code from a file: a pickle payload planted in a workdir's files is never
executed by eval, routing, export, the clip_benchmark loader or train (resume), and each command
ends in one line naming a file it refused.

The payload is what the issue reproduced: `torch.save` of an object whose `__reduce__` creates
a marker file when unpickled.
"""

import io
import shutil
from pathlib import Path

import pytest
import torch

from limoe.cli import main
from limoe.config import dump_config, load_config
from limoe.errors import LimoeError
from limoe.evaluate.clip_benchmark import load_limoe
from tests.helpers import QUICK_EVERY_STEP, ROOT, error_line, run_args

HELDOUT = str(ROOT / "data_shards" / "heldout")


class Payload:
    """Unpickling this creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _payload_bytes(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"module": Payload(marker)}, buffer)
    return buffer.getvalue()


def _train_args(workdir: Path, steps: int) -> list[str]:
    return run_args("train", workdir, f"train.steps={steps}", *QUICK_EVERY_STEP)


def _commands(workdir: Path, scratch: Path) -> dict:
    """Each command a user could point at the workdir: name → callable returning (status, stderr line)."""
    def cli(*args):
        return lambda: main(list(args))

    def clip_benchmark(pretrained: Path):
        def run():
            try:
                load_limoe("limoe", str(pretrained))
            except LimoeError as error:
                print(f"limoe: error: {error}", file=__import__("sys").stderr)
                return 2
            return 0
        return run

    return {
        "eval": cli("eval", "retrieval", "--checkpoint", str(workdir), "--data", HELDOUT, "--device", "cpu",
                    "--workers", "0"),
        "eval of the exported file": cli("eval", "retrieval", "--checkpoint", str(workdir / "model.safetensors"),
                                         "--data", HELDOUT, "--device", "cpu", "--workers", "0"),
        "routing": cli("routing", "--checkpoint", str(workdir), "--data", HELDOUT, "--output", str(scratch / "routing"),
                       "--device", "cpu"),
        "export": cli("export", "--workdir", str(workdir), "--output", str(scratch / "exported.safetensors")),
        "clip_benchmark loader": clip_benchmark(workdir),
        "clip_benchmark loader on the exported file": clip_benchmark(workdir / "model.safetensors"),
        "train": cli(*_train_args(workdir, steps=2)),
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A workdir as one short `limoe train` leaves it: config, metrics, TensorBoard, a lock file,
    a checkpoint, the exported model and the final report."""
    workdir = tmp_path_factory.mktemp("run") / "workdir"
    assert main(_train_args(workdir, steps=1)) == 0
    return workdir


def _files(workdir: Path) -> list[Path]:
    return sorted(p for p in workdir.rglob("*") if p.is_file())


def test_a_payload_in_every_file_of_a_workdir_runs_in_no_command(pristine, tmp_path, capsys):
    workdir = tmp_path / "workdir"
    shutil.copytree(pristine, workdir)
    marker = tmp_path / "code-ran"
    for path in _files(workdir):
        path.write_bytes(_payload_bytes(marker))
    capsys.readouterr()
    for name, command in _commands(workdir, tmp_path).items():
        status = command()
        err = capsys.readouterr().err
        assert not marker.exists(), f"{name} ran the payload"
        assert status == 2, (name, err)
        line = error_line(err)
        named = [path for path in _files(workdir) if path.name in line]
        assert named, (name, err)


def test_a_payload_in_any_one_file_runs_nothing_and_a_refusal_names_it(pristine, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    for planted in _files(pristine):
        workdir = tmp_path / "workdir"
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.copytree(pristine, workdir)
        target = workdir / planted.relative_to(pristine)
        target.write_bytes(_payload_bytes(marker))
        commands = _commands(workdir, tmp_path)
        for name in ("export", "clip_benchmark loader", "clip_benchmark loader on the exported file"):
            status = commands[name]()
            err = capsys.readouterr().err
            assert not marker.exists(), (name, planted.name)
            if status != 0:
                assert status == 2, (name, planted.name, err)
                error_line(err, target.name)


def test_a_deepspeed_pickle_checkpoint_from_an_earlier_version_is_refused_unread(tmp_path, capsys):
    """The issue's reproduction: a pickle beside a valid config.yaml and `latest`."""
    workdir = tmp_path / "workdir"
    step = workdir / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    dump_config(load_config("demo"), workdir / "config.yaml")
    (workdir / "checkpoints" / "latest").write_text("step_00000001")
    marker = tmp_path / "code-ran"
    (step / "mp_rank_00_model_states.pt").write_bytes(_payload_bytes(marker))
    capsys.readouterr()
    for name, command in _commands(workdir, tmp_path).items():
        if "exported file" in name:
            continue
        status = command()
        err = capsys.readouterr().err
        assert not marker.exists(), f"{name} ran the payload"
        assert status == 2, (name, err)
        line = error_line(err, "mp_rank_00_model_states.pt")
    assert "pickle format" in line
