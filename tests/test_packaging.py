"""The package as users install it: a wheel built from this checkout, installed into a fresh virtual
environment and run from outside the checkout, finds its shipped configs and trains.

The environment cannot download torch, so it is created without pip and sees the running
interpreter's site-packages through a .pth file; a .pth line adds a directory to sys.path without
running the .pth files inside it, so this checkout's editable install stays inert there, and the
test checks that `limoe` is imported from the new environment.
"""

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "limoe", "kernels", "configs")


def _run(command: list, cwd: Path, timeout: int = 300) -> str:
    env = child_env(drop=("PYTHONPATH",), OMP_NUM_THREADS="1")
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin folder."""
    if not all(importlib.util.find_spec(name) for name in ("pip", "setuptools")):
        pytest.skip("building a wheel without network needs pip and setuptools installed")
    root = tmp_path_factory.mktemp("package")
    source = root / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source],
         root)
    (wheel,) = (root / "dist").glob("limoe-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], root)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    host = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (purelib / "_host_packages.pth").write_text("\n".join(host) + "\n")
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "-q", wheel], root)
    return venv / "bin"


def test_a_wheel_outside_the_checkout_imports_itself_and_finds_its_configs(installed, tmp_path):
    where = _run([installed / "python", "-c", "import limoe, limoe_kernels, limoe.configs as c; "
                  "print(limoe.__file__, limoe_kernels.__file__, c.__file__, sep='\\n')"], tmp_path)
    assert all(Path(line).is_relative_to(installed.parent) for line in where.split()), where
    assert "5.61B total" in _run([installed / "limoe", "info", "limoe-h14"], tmp_path)


@pytest.mark.slow
def test_a_wheel_outside_the_checkout_trains_on_the_demo_shards(installed, tmp_path):
    demo = ROOT / "data_shards"
    _run([installed / "limoe", "train", "--workdir", "run", "--set", "train.steps=2", "--set", "train.batch_size=16",
          "--set", "data.workers=0", "--set", f"data.train={demo / 'train'}", "--set", f"data.heldout={demo / 'heldout'}"],
         tmp_path)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "final_metrics.json").is_file()
