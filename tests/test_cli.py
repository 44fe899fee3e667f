"""The command line: subcommands exist, `info` reports, launcher flags and bad input are handled."""

import argparse
import errno
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from limoe.cli import build_parser, main
from tests.child_env import child_env
from tests.helpers import refused, run_limoe


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "limoe", "--help"], capture_output=True, text=True, env=child_env())
    assert result.returncode == 0
    for command in ("info", "train", "export", "eval", "tune", "routing", "shards"):
        assert command in result.stdout


def test_info_prints_architecture_and_parameter_counts():
    out = run_limoe(["info", "limoe-h14"])
    assert "[9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31]" in out
    assert "5.61B total, 673.2M applied per token" in out


def test_the_deepspeed_launchers_local_rank_flag_comes_before_the_subcommand():
    assert "limoe-tiny" in run_limoe(["--local_rank=1", "info", "limoe-tiny"])


@pytest.mark.parametrize("args, message", [
    (["info", "limoe-xxl"], "no models config named 'limoe-xxl'"),
    (["info", "limoe-tiny", "--set", "moe.layers=[7]"], "beyond the model's depth 4"),
    (["export", "--workdir", "/no/such/run", "--output", "x.safetensors"], "holds no complete training checkpoint"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(args, message):
    refused(args, message)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "argument --batch-size: 0 is out of range; give a whole number ≥ 1"),
    (["--batch-size", "many"], "argument --batch-size: 'many' is not a whole number"),
    (["--workers", "-1"], "argument --workers: -1 is out of range; give a whole number ≥ 0"),
    (["--capacity-factor", "-1"], "argument --capacity-factor: '-1' is out of range"),
    (["--capacity-factor", "nan"], "argument --capacity-factor: 'nan' is out of range"),
    (["--capacity-factor", "inf"], "argument --capacity-factor: 'inf' is out of range"),
])
def test_eval_options_out_of_range_are_one_line_before_anything_is_loaded(args, message):
    """The checkpoint does not exist: an error about it would mean the options were checked too late."""
    tune = ["tune", "--shots", "1", "--steps", "1", "--output", "tuned.safetensors"]
    for command in (["eval", "zeroshot"], ["eval", "retrieval"], ["eval", "choice", "--format", "jsonl"], tune):
        refused([*command, "--checkpoint", "/no/such/model", "--data", "/no/such/data", *args], message)


def test_routing_options_out_of_range_are_one_line():
    base = ["routing", "--checkpoint", "/no/such/model", "--data", "/no/such/data", "--output", "out"]
    for args, message in ((["--num-batches", "0"], "--num-batches: 0 is out of range"),
                          (["--batch-size", "-3"], "--batch-size: -3 is out of range"),
                          (["--capacity-factor", "0"], "--capacity-factor: '0' is out of range")):
        refused([*base, *args], message)


@pytest.mark.parametrize("args, message", [
    (["--shots", "0"], "argument --shots: 0 is out of range; give a whole number ≥ 1"),
    (["--steps", "-1"], "argument --steps: -1 is out of range; give a whole number ≥ 0"),
    (["--lr", "0"], "argument --lr: '0' is out of range; give a finite number > 0"),
    (["--lr", "nan"], "argument --lr: 'nan' is out of range; give a finite number > 0"),
    (["--tune-batch-size", "0"], "argument --tune-batch-size: 0 is out of range"),
    (["--prompt-tokens", "0"], "argument --prompt-tokens: 0 is out of range"),
    (["--seed", "x"], "argument --seed: 'x' is not a whole number"),
    (["--metrics", "/"], "--metrics / is a directory"),
])
def test_tune_options_out_of_range_are_one_line_before_anything_is_loaded(args, message):
    base = {"--shots": "1", "--steps": "1"}
    base.update(zip(args[::2], args[1::2]))
    argv = ["tune", "--checkpoint", "/no/such/model", "--data", "/no/such/data", "--output", "tuned.safetensors"]
    refused([*argv, *(item for pair in base.items() for item in pair)], message)


def test_tune_refuses_to_overwrite_the_checkpoint_it_tunes(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    refused(["tune", "--checkpoint", str(model), "--data", "/no/such/data", "--shots", "1", "--steps", "1",
                     "--output", str(model)], "is an input of this command")
    assert model.read_bytes() == b"weights"


def _read_only_below(monkeypatch, folder: Path) -> None:
    """Creating files in `folder` fails as on a read-only mount (root ignores permission bits)."""
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("command", ["zeroshot", "retrieval", "choice", "tune", "routing", "export"])
@pytest.mark.parametrize("where", ["empty", "a directory", "read-only"])
def test_output_paths_are_checked_before_the_work_starts(tmp_path, monkeypatch, command, where):
    target = {"empty": "", "a directory": str(tmp_path), "read-only": str(tmp_path / "locked" / "out.json")}[where]
    if where == "read-only":
        (tmp_path / "locked").mkdir()
        _read_only_below(monkeypatch, tmp_path / "locked")
    if command == "routing" and where == "a directory":
        target = str(tmp_path / "file.txt")
        Path(target).write_text("")
    if command == "export":
        args = ["export", "--workdir", "/no/such/run", "--output", target]
    elif command == "routing":
        args = ["routing", "--checkpoint", "/no/such/model", "--data", "/no/such/data", "--output", target]
    elif command == "tune":
        args = ["tune", "--checkpoint", "/no/such/model", "--data", "/no/such/data", "--shots", "1", "--steps", "1",
                "--output", target]
    elif command == "choice":
        args = ["eval", "choice", "--format", "jsonl", "--checkpoint", "/no/such/model", "--data", "/no/such/data",
                "--output", target]
    else:
        args = ["eval", command, "--checkpoint", "/no/such/model", "--data", "/no/such/data", "--output", target]
    expected = {"empty": "--output is empty", "a directory": "is a directory" if command != "routing" else "is a file",
                "read-only": "the file system is read-only"}[where]
    assert "/no/such" not in refused(args, expected)


def _subcommands(parser: argparse.ArgumentParser, path: tuple = ()) -> dict:
    """Every leaf subcommand of `parser` by its words, e.g. ('eval', 'knn') → its parser."""
    groups = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not groups:
        return {path: parser}
    return {found: sub for name, child in groups[0].choices.items()
            for found, sub in _subcommands(child, (*path, name)).items()}


def _model_options(parser: argparse.ArgumentParser) -> dict:
    """The shared model options a subcommand declares, with what a user sees of each."""
    return {action.option_strings[0]: (action.default, action.choices, action.required)
            for action in parser._actions if action.option_strings[0] in MODEL_OPTIONS}


MODEL_OPTIONS = ("--checkpoint", "--data", "--batch-size", "--capacity-factor", "--device", "--workers")


def test_every_checkpoint_command_takes_the_same_model_options():
    commands = {path: sub for path, sub in _subcommands(build_parser()).items()
                if "--checkpoint" in sub._option_string_actions}
    assert set(commands) == {("eval", "zeroshot"), ("eval", "retrieval"), ("eval", "knn"), ("eval", "choice"),
                             ("tune",), ("routing",)}
    expected = {"--checkpoint": (None, None, True), "--data": (None, None, True), "--batch-size": (64, None, False),
                "--capacity-factor": (None, None, False), "--device": ("auto", ["auto", "cpu", "cuda"], False),
                "--workers": (2, None, False)}
    for path, sub in commands.items():
        assert _model_options(sub) == expected, path


def test_routing_passes_workers_to_the_report(monkeypatch):
    import limoe.routing_report.command as routing

    calls = []
    monkeypatch.setattr(routing, "run_routing_report", lambda **options: calls.append(options))
    assert main(["routing", "--checkpoint", "model.safetensors", "--data", "shards", "--output", "out",
                 "--workers", "0", "--keys", "a,b"]) == 0
    assert calls == [{"checkpoint": Path("model.safetensors"), "data": "shards", "output": "out", "num_batches": 4,
                      "batch_size": 64, "capacity_factor": None, "device": "auto", "workers": 0, "compare": None,
                      "block": None, "keys": ["a", "b"], "modality": "image"}]


@pytest.mark.parametrize("evaluation, args, own", [
    ("zeroshot", ["--templates", "simple", "--modality", "audio"],
     {"classnames": None, "templates": "simple", "candidate_images": None, "resize_on": "worker",
      "decode_on": "worker", "modality": "audio", "still_frame": False}),
    ("retrieval", ["--resize-on", "device", "--decode-on", "device"],
     {"resize_on": "device", "decode_on": "device", "modality": "image", "still_frame": False}),
    ("knn", ["--k", "3", "--random-init", "--resize-on", "device", "--modality", "video", "--still-frame"],
     {"k": 3, "random_init": True, "resize_on": "device", "decode_on": "worker", "modality": "video",
      "still_frame": True}),
    ("choice", ["--format", "jsonl", "--ties", "strict"], {"format": "jsonl", "subsets": None, "ties": "strict"}),
])
def test_each_evaluation_gets_the_model_options_and_its_own(monkeypatch, evaluation, args, own):
    module = importlib.import_module(f"limoe.evaluate.{evaluation}")
    calls = []
    monkeypatch.setattr(module, f"run_{evaluation}", lambda **options: calls.append(options))
    assert main(["eval", evaluation, "--checkpoint", "m", "--data", "d", "--workers", "0", "--batch-size", "7",
                 "--capacity-factor", "dropless", "--device", "cpu", "--output", "o.json", *args]) == 0
    assert calls == [{"checkpoint": Path("m"), "data": "d", "output": "o.json", "batch_size": 7,
                      "capacity_factor": "dropless", "device": "cpu", "workers": 0, **own}]


def test_a_capacity_factor_that_is_no_number_names_the_choices():
    refused(["routing", "--checkpoint", "m", "--data", "d", "--output", "o", "--capacity-factor", "many"],
            "argument --capacity-factor: 'many' is not a number; give one such as 2.0, or 'dropless'")
