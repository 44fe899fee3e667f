"""What limoe's commands read and write: an output never replaces an input, files named by a data
file stay in its folder, writes inside a workdir never follow a link out, stale temporary files
of killed writers are removed, and text files that are not UTF-8 are one line, not a traceback.

The refusals are end-to-end `limoe` runs (in-process), checked by exit status 2, one line on
stderr, and the input's bytes read back unchanged."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from limoe.checkpoints.hub import CONFIG_FILE, WEIGHTS_FILE
from limoe.checkpoints.store import CHECKPOINT_DIR, step_dir_name
from limoe.errors import LimoeError
from limoe.evaluate.choice_sets import read_choice_sets
from limoe.prompt_templates import load_classnames
from limoe.files import atomic_write
from limoe.training.workdir import locked_workdir
from tests.helpers import refused, write_config

DEMO = Path(__file__).resolve().parents[1] / "data_shards"
NOT_UTF8 = "caf\xe9\n".encode("latin-1")  # 'café' in Latin-1: byte 3 is not UTF-8


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model(checkpoint, tmp_path) -> Path:
    """A copy of the tiny model file, so a test that went wrong cannot harm the shared one."""
    copy = tmp_path / "m.safetensors"
    shutil.copyfile(checkpoint, copy)
    return copy


@pytest.fixture
def workdir(checkpoint, tmp_path) -> tuple[Path, Path]:
    """A workdir whose newest checkpoint holds one tensor file (never loaded: the refusals come
    first); returns the workdir and that file."""
    step = tmp_path / "run" / CHECKPOINT_DIR / step_dir_name(7)
    step.mkdir(parents=True)
    tensors = step / "model.rank00000.safetensors"
    shutil.copyfile(checkpoint, tensors)
    return tmp_path / "run", tensors


def _model_folder(checkpoint: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copyfile(checkpoint, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text("{}\n")
    return folder


def _eval(kind: str, checkpoint: Path, output: Path, data: str = "/no/such/data") -> list[str]:
    extra = ["--format", "jsonl"] if kind == "choice" else []
    return ["eval", kind, "--checkpoint", str(checkpoint), "--data", data, "--output", str(output), *extra]


def _tune(checkpoint: Path, output: Path, *options: str) -> list[str]:
    return ["tune", "--checkpoint", str(checkpoint), "--data", "/no/such/data", "--shots", "1", "--steps", "1",
            "--output", str(output), *options]


# ---------------------------------------------------------------------------------------------
# An output never replaces an input


@pytest.mark.parametrize("kind", ["zeroshot", "retrieval", "knn", "choice"])
def test_an_evaluation_never_writes_its_metrics_over_the_model(model, kind):
    before = _digest(model)
    refused(_eval(kind, model, model), f"--output {model} is an input of this command")
    assert _digest(model) == before


def test_a_link_or_another_spelling_of_the_model_is_the_model(model, tmp_path):
    before = _digest(model)
    link = tmp_path / "link.safetensors"
    link.symlink_to(model)
    refused(_eval("retrieval", model, link), "an input of this command")
    hard = tmp_path / "hard.safetensors"
    os.link(model, hard)
    refused(_eval("retrieval", model, hard), "an input of this command")
    refused(_eval("retrieval", model, tmp_path / "sub" / ".." / model.name), "an input of this command")
    assert _digest(model) == before


def test_tune_never_replaces_a_file_of_the_model_folder_it_reads(checkpoint, tmp_path):
    folder = _model_folder(checkpoint, tmp_path / "hf")
    before = _digest(folder / WEIGHTS_FILE)
    refused(_tune(folder, folder / WEIGHTS_FILE), "is an input of this command")
    assert _digest(folder / WEIGHTS_FILE) == before


def test_tune_never_writes_into_the_checkpoints_of_a_workdir_it_reads(workdir):
    run, tensors = workdir
    before = _digest(tensors)
    refused(_tune(run, tensors), f"lies inside {run / CHECKPOINT_DIR}, an input of this command")
    assert _digest(tensors) == before


def test_tune_refuses_the_same_file_for_the_model_and_the_metrics(model, tmp_path):
    output = tmp_path / "t.safetensors"
    refused(_tune(model, output, "--metrics", str(output)), "is the same file as --output")
    assert not output.exists()


def test_export_never_writes_over_the_checkpoint_it_exports(workdir):
    run, tensors = workdir
    before = _digest(tensors)
    refused(["export", "--workdir", str(run), "--output", str(tensors)], "an input of this command")
    refused(["export", "--workdir", str(run), "--output", str(tensors.parent), "--format", "hf"],
             "an input of this command")
    assert _digest(tensors) == before and sorted(p.name for p in tensors.parent.iterdir()) == [tensors.name]


def test_routing_never_writes_into_the_checkpoint_it_reads(workdir):
    run, tensors = workdir
    refused(["routing", "--checkpoint", str(tensors.parent), "--data", "/no/such/data", "--output",
                      str(tensors.parent / "report")], "an input of this command")
    assert sorted(p.name for p in tensors.parent.iterdir()) == [tensors.name]


def test_an_evaluation_never_writes_over_its_class_names(model, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    refused([*_eval("zeroshot", model, names), "--classnames", str(names)], "an input of this command")
    assert names.read_text() == "cat\ndog\n"


def test_shards_are_never_written_into_the_images_they_are_built_from(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (5, 3)).save(images / "a.png")
    captions = tmp_path / "captions.csv"
    captions.write_text("file,caption\na.png,a black block\n")
    refused(["shards", "build", "--images", str(images), "--captions", str(captions), "--output",
                      str(images / "shards")], f"lies inside {images}")
    assert [p.name for p in images.iterdir()] == ["a.png"]


def test_a_run_never_trains_into_the_checkpoints_it_starts_from(workdir):
    run, tensors = workdir
    before = _digest(tensors)
    refused(["train", "--workdir", str(run / CHECKPOINT_DIR / "new"), "--set", f"train.init_from={run}"],
             f"lies inside {run / CHECKPOINT_DIR}")
    assert _digest(tensors) == before and not (run / CHECKPOINT_DIR / "new").exists()


# ---------------------------------------------------------------------------------------------
# Writes inside a workdir stay inside it


@pytest.mark.parametrize("name", ["train.lock", "metrics.jsonl"])
def test_a_workdir_file_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path, name):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(outside)
    with pytest.raises(LimoeError, match=f"{name} is a symbolic link"):
        with locked_workdir(run, rank=0):
            pass
    assert outside.read_text() == "keep me\n"


# ---------------------------------------------------------------------------------------------
# Image paths named by a choice set stay in its folder


@pytest.fixture
def outside_image(tmp_path) -> Path:
    """An image beside, not inside, the set's folder `tmp_path / 'set'`."""
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    (tmp_path / "set").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "set" / "inside.png")
    return tmp_path / "outside.png"


@pytest.mark.parametrize("reference", ["../outside.png", "absolute", "link.png"])
def test_jsonl_image_paths_that_leave_the_set_are_refused(outside_image, reference):
    folder = outside_image.parent / "set"
    (folder / "link.png").symlink_to(outside_image)
    name = str(outside_image) if reference == "absolute" else reference
    (folder / "items.jsonl").write_text(json.dumps({"images": ["inside.png", name], "texts": ["x"], "answer": 0}))
    with pytest.raises(LimoeError, match=f"items.jsonl line 1: image '{name}' lies outside"):
        read_choice_sets(folder / "items.jsonl", "jsonl")


def test_a_winoground_name_that_leaves_the_images_folder_is_refused(outside_image):
    folder = outside_image.parent / "set"
    (folder / "images").mkdir()
    shutil.copyfile(folder / "inside.png", folder / "images" / "ex_0.png")
    example = {"caption_0": "a", "caption_1": "b", "image_0": "ex_0", "image_1": "../../outside"}
    (folder / "examples.jsonl").write_text(json.dumps(example) + "\n")
    with pytest.raises(LimoeError, match="examples.jsonl line 1: image '../../outside' lies outside"):
        read_choice_sets(folder, "winoground")


@pytest.mark.parametrize("filename", ["../../etc/passwd", "../../no/such/file"])
def test_a_sugar_crepe_filename_outside_says_nothing_of_what_exists_there(outside_image, filename):
    folder = outside_image.parent / "set"
    item = {"filename": filename, "caption": "a", "negative_caption": "b"}
    (folder / "replace_att.json").write_text(json.dumps({"0": item}))
    # the same line whether the outside file exists or not
    refused(["eval", "choice", "--checkpoint", "/no/such/model", "--data", str(folder), "--format",
                      "sugar_crepe"], f"replace_att.json: item 0: image '{filename}' lies outside {folder}")


# ---------------------------------------------------------------------------------------------
# Stale temporary files


def _dead_pid() -> int:
    """The pid of a process this test started and that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_removes_the_temporary_files_of_dead_writers_only(tmp_path):
    target = tmp_path / "model.safetensors"
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        temporaries = {
            "dead": tmp_path / f".model.safetensors.tmp-{host}-{_dead_pid()}",
            "dead, named before hosts were": tmp_path / f".model.safetensors.tmp-{_dead_pid()}",
            "alive": tmp_path / f".model.safetensors.tmp-{host}-{live.pid}",
            "other host": tmp_path / f".model.safetensors.tmp-{host}x-{_dead_pid()}",
            "another file's": tmp_path / f".other.safetensors.tmp-{host}-{_dead_pid()}",
        }
        for path in temporaries.values():
            path.write_bytes(b"half a model")
        atomic_write(target, lambda tmp: tmp.write_bytes(b"weights"))
        left = {name for name, path in temporaries.items() if path.exists()}
    finally:
        live.kill()
        live.wait()
    assert target.read_bytes() == b"weights"
    assert left == {"alive", "other host", "another file's"}


# ---------------------------------------------------------------------------------------------
# Text files: one line for a folder, other bytes, or a base: cycle


def test_a_config_that_is_a_folder_or_not_utf8_or_its_own_base_is_one_line(tmp_path):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    refused(["config", "show", "--config", str(folder)], f"config file {folder} is a folder")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: " + NOT_UTF8)
    refused(["config", "show", "--config", str(latin)], f"config file {latin} must be UTF-8 text")
    write_config(tmp_path / "a.yaml", {"base": str(tmp_path / "b.yaml")})
    write_config(tmp_path / "b.yaml", {"base": str(tmp_path / "a.yaml")})
    refused(["config", "show", "--config", str(tmp_path / "a.yaml")], "name each other as base")


def test_a_choice_file_that_is_not_utf8_is_one_line(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_bytes(b'{"images": ["a.png"], "texts": ["' + NOT_UTF8.strip() + b'", "b"], "answer": 0}\n')
    refused(["eval", "choice", "--checkpoint", "/no/such/model", "--data", str(items), "--format", "jsonl"],
             f"choice file {items} must be UTF-8 text")


def test_class_names_that_are_not_utf8_are_one_line(checkpoint, tmp_path):
    names = tmp_path / "names.txt"
    names.write_bytes(NOT_UTF8 * 10)
    refused(["eval", "zeroshot", "--checkpoint", str(checkpoint), "--data", str(DEMO / "heldout_cls"),
                      "--classnames", str(names), "--workers", "0", "--device", "cpu"],
             f"class names file {names} must be UTF-8 text")
    with pytest.raises(LimoeError, match="must be UTF-8 text"):  # co-training's task classnames
        load_classnames(names)


def test_captions_that_are_not_utf8_are_one_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (5, 3)).save(images / "a.png")
    captions = tmp_path / "captions.csv"
    captions.write_bytes(b"file,caption\na.png," + NOT_UTF8)
    refused(["shards", "build", "--images", str(images), "--captions", str(captions), "--output",
                      str(tmp_path / "shards")], f"captions file {captions} must be UTF-8 text")


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_saved_tensors_get_the_mode_the_umask_gives_and_the_umask_is_left_alone(tmp_path, umask):
    import stat

    import torch

    from limoe.files import save_safetensors

    previous = os.umask(umask)
    try:
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
        assert os.umask(umask) == umask
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o666 & ~umask
