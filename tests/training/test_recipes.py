"""The paper-scale recipes under configs/train: their launch lines work pasted into bash, and each
fits 80 GB GPUs at its stated GPU count according to `limoe plan`."""

import json
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from limoe.cli import build_parser, main
from limoe.config import CONFIG_DIR

RECIPES = sorted(p for p in (CONFIG_DIR / "train").glob("limoe-*.yaml"))
SHARDS = "/data/laion/{00000..41455}.tar"
# Stands in for the deepspeed launcher: prints the launcher's options and the module's arguments.
LAUNCHER_STUB = """#!{python}
import json, sys
args = sys.argv[1:]
module = args.index("--module")
print(json.dumps({{"launcher": args[:module], "module": args[module + 1], "arguments": args[module + 2:]}}))
"""


def launch_line(recipe: Path) -> str:
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# deepspeed "), f"{recipe.name} does not start with its launch line"
    return first[2:]


def gpus(line: str) -> int:
    words = shlex.split(line)
    value = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--num_")}
    return int(value["--num_gpus"]) * int(value.get("--num_nodes", 1))


def test_there_are_recipes():
    assert {p.stem for p in RECIPES} >= {"limoe-s32", "limoe-b32", "limoe-b16", "limoe-l16", "limoe-h14"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_the_launch_line_reaches_limoe_train_with_the_shard_pattern_as_one_argument(recipe, tmp_path):
    stub = tmp_path / "bin" / "deepspeed"
    stub.parent.mkdir()
    stub.write_text(LAUNCHER_STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    line = launch_line(recipe)
    result = subprocess.run(["bash", "-c", line], env={"PATH": f"{stub.parent}:/usr/bin:/bin"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    launched = json.loads(result.stdout)
    assert launched["module"] == "limoe"
    args = build_parser().parse_args(["--local_rank=0", *launched["arguments"]])  # as the launcher passes it
    assert args.command == "train" and Path(args.config).name == recipe.name
    assert f"data.train={SHARDS}" in args.set


@pytest.mark.parametrize("recipe", [pytest.param(p, marks=[] if p.stem in ("limoe-s32", "limoe-b16") else pytest.mark.slow)
                                    for p in RECIPES], ids=lambda p: p.stem)  # B/32, L/16, H/14's plans: slow
def test_limoe_plan_says_the_recipe_fits_80_gb_at_its_gpu_count(recipe, capsys):
    count = gpus(launch_line(recipe))
    status = main(["plan", "--config", str(recipe), "--gpus", str(count), "--gpu-memory", "80"])
    report = capsys.readouterr().out
    assert status == 0, report
    total = re.search(r"^\s+total\s+([\d.]+)\s+fits$", report, re.MULTILINE)
    assert total and float(total.group(1)) <= 80, report
