"""The command line: subcommands exist, `info` reports, launcher flags and bad input are handled."""

import subprocess
import sys

import pytest

from limoe.cli import main


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "limoe", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("info", "train", "export", "eval", "routing", "shards"):
        assert command in result.stdout


def test_info_prints_architecture_and_parameter_counts(capsys):
    assert main(["info", "limoe-h14"]) == 0
    out = capsys.readouterr().out
    assert "[9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31]" in out
    assert "5.61B total, 673.2M applied per token" in out


def test_the_deepspeed_launchers_local_rank_flag_comes_before_the_subcommand(capsys):
    assert main(["--local_rank=1", "info", "limoe-tiny"]) == 0
    assert "limoe-tiny" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["info", "limoe-xxl"], "no models config named 'limoe-xxl'"),
    (["info", "limoe-tiny", "--set", "moe.layers=[7]"], "beyond the model's depth 4"),
    (["export", "--workdir", "/no/such/run", "--output", "x.safetensors"], "holds no complete training checkpoint"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
