"""Start-up: `limoe --help` and `--version` import no torch, the libraries that need telling about the
machine are told before their first import, and a folder named `limoe` beside a script does not
hide the installed package."""

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd=None, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                            env=child_env(drop=("PYTHONPATH", "TRITON_INTERPRET", "DS_ACCELERATOR"), **env))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_help_of_the_command_and_its_subcommands_imports_no_torch():
    code = """
import sys
from limoe.cli import main
for argv in (["--help"], ["eval", "--help"], ["eval", "zeroshot", "--help"], ["--version"]):
    try:
        main(argv)
    except SystemExit as done:
        assert done.code == 0, argv
print(sorted({"torch", "deepspeed", "open_clip", "webdataset", "matplotlib"} & sys.modules.keys()))
"""
    assert _python(code).splitlines()[-1] == "[]"


def test_version_is_the_installed_distributions():
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = subprocess.run([sys.executable, "-m", "limoe", "--version"], capture_output=True, text=True,
                            env=child_env())
    assert result.returncode == 0 and result.stdout == f"limoe {expected}\n"


def test_triton_and_deepspeed_are_told_about_the_machine_before_open_clip_imports_them():
    """open_clip imports Triton through torch._dynamo; the kernels must come first so that on a
    machine without CUDA Triton's interpreter is on (a Triton op then runs on CPU tensors, equal to
    the reference) and DeepSpeed knows it runs on the CPU."""
    code = """
import os
import limoe
import open_clip
import torch
if torch.cuda.is_available():
    print(os.environ.get("TRITON_INTERPRET"), os.environ.get("DS_ACCELERATOR"), True)
else:
    from limoe_kernels import REFERENCE_OPS, TRITON_OPS
    expert = torch.tensor([[0, 2, 2, -1, 2, 1, 0]])
    gate, modality = torch.rand(1, 7), torch.zeros(1, 7, dtype=torch.long)
    slots = [ops.assign_slots(expert, gate, modality, 3, 2, True).slot for ops in (REFERENCE_OPS, TRITON_OPS)]
    print(os.environ.get("TRITON_INTERPRET"), os.environ.get("DS_ACCELERATOR"), torch.equal(*slots))
"""
    interpret, accelerator, same = _python(code).splitlines()[-1].split()
    assert same == "True"
    assert (interpret, accelerator) in (("None", "None"), ("1", "cpu"))


def test_a_folder_named_limoe_beside_the_script_does_not_hide_the_installed_package(tmp_path):
    """The checkout seen from its parent folder: a `limoe` folder without __init__.py, which Python
    would import as an empty namespace package if the installed one were found only after sys.path."""
    checkout = tmp_path / "limoe"
    for folder in ("limoe", "kernels", "configs", "tests"):
        (checkout / folder).mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\nname = 'limoe'\n")
    script = tmp_path / "script.py"
    show = "import limoe; print(limoe.__version__, limoe.__spec__.origin)"
    script.write_text(show)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    expected = _python(show, cwd=elsewhere)
    result = subprocess.run([sys.executable, str(script)], cwd=elsewhere, capture_output=True, text=True,
                            env=child_env(drop=("PYTHONPATH",)))  # the script's folder comes first on sys.path
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == expected
    assert _python(show, cwd=tmp_path) == expected  # python -c: the current folder comes first
