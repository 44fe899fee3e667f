"""The `limoe plan` figures quoted in the shipped recipes and docs/TRAINING.md, regenerated from the command.

Each recipe `configs/train/limoe-*.yaml` says in its first comment line how it is launched (DeepSpeed's
`--num_gpus G`, and `--num_nodes K` beyond one node) and in its header what `limoe plan` gives per
GPU for that many 80 GiB GPUs; docs/TRAINING.md quotes the same figure in its recipe table and
shows whole `limoe plan` reports of recipes. `python -m limoe.plan.recipe_figures` from the
repository root plans every recipe and rewrites those places (a minute or two on a CPU:
activations are measured model by model); tests/plan/test_recipe_figures.py checks them against
`limoe plan`'s own output, so a change to the plan cannot leave the recipes and docs behind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from limoe.config import load_config
from limoe.plan.memory import GiB, format_plan, plan_memory

GPU_MEMORY_GIB = 80
RECIPES = "configs/train/limoe-*.yaml"
TRAINING_DOC = "docs/TRAINING.md"
RECIPE_FIGURE = re.compile(rf"`limoe plan` on {GPU_MEMORY_GIB} GiB GPUs: ([\d.]+) GiB per GPU")
DOC_TABLE_ROW = re.compile(r"^(\| (limoe-\w+) \|.*\| )([\d.]+)( \|)$", re.MULTILINE)
DOC_REPORT = re.compile(rf"(```\n\$ limoe plan --config configs/train/(limoe-\w+)\.yaml --gpus (\d+) "
                        rf"--gpu-memory {GPU_MEMORY_GIB}\n)(.*?)(\n```)", re.DOTALL)


def recipe_paths(root: Path) -> list[Path]:
    return sorted(root.glob(RECIPES))


def recipe_gpus(recipe_text: str) -> int:
    """GPUs of the recipe's launch line (its first line): --num_gpus per node times --num_nodes."""
    launch = recipe_text.splitlines()[0]
    per_node, nodes = re.search(r"--num_gpus (\d+)", launch), re.search(r"--num_nodes (\d+)", launch)
    if per_node is None:
        raise ValueError(f"the first line of the recipe does not launch it with --num_gpus: {launch}")
    return int(per_node.group(1)) * (int(nodes.group(1)) if nodes else 1)


def quoted_recipe_figure(recipe_text: str) -> str:
    """The per-GPU GiB a recipe's header quotes."""
    found = RECIPE_FIGURE.search(recipe_text)
    if found is None:
        raise ValueError(f"the recipe quotes no figure in the form {RECIPE_FIGURE.pattern!r}")
    return found.group(1)


def quoted_doc_figures(doc_text: str) -> dict[str, str]:
    """Recipe name → the per-GPU GiB of the recipe table in docs/TRAINING.md."""
    return {found.group(2): found.group(3) for found in DOC_TABLE_ROW.finditer(doc_text)}


def quoted_doc_reports(doc_text: str) -> dict[tuple[str, int], str]:
    """(recipe, GPUs) → the `limoe plan` report shown for it in docs/TRAINING.md."""
    return {(found.group(2), int(found.group(3))): found.group(4) for found in DOC_REPORT.finditer(doc_text)}


def with_recipe_figure(recipe_text: str, figure: str) -> str:
    return RECIPE_FIGURE.sub(lambda found: found.group(0).replace(found.group(1), figure), recipe_text, count=1)


def with_doc_figures(doc_text: str, figures: dict[str, str], report: Callable[[str, int], str]) -> str:
    """docs/TRAINING.md with the recipe table's figures and the shown reports (`report(name, gpus)`) replaced."""
    text = DOC_TABLE_ROW.sub(lambda found: found.group(1) + figures.get(found.group(2), found.group(3))
                             + found.group(4), doc_text)
    return DOC_REPORT.sub(lambda found: found.group(1) + report(found.group(2), int(found.group(3))) + found.group(5),
                          text)


def plan_report(root: Path, name: str, gpus: int) -> str:
    """What `limoe plan --config configs/train/NAME.yaml --gpus GPUS --gpu-memory 80` prints."""
    config_name = f"configs/train/{name}.yaml"
    plan = plan_memory(load_config(str(root / config_name)), gpus, GPU_MEMORY_GIB * GiB)
    return format_plan(plan, config_name)


def planned_figure(report: str) -> str:
    """The total per-GPU GiB of a `limoe plan` report."""
    return re.search(r"^  total +([\d.]+) ", report, re.MULTILINE).group(1)


def regenerate(root: Path) -> list[Path]:
    """Plan every recipe and rewrite its figure and docs/TRAINING.md's; returns the files changed."""
    changed, figures, reports = [], {}, {}
    for path in recipe_paths(root):
        text = path.read_text()
        gpus = recipe_gpus(text)
        reports[path.stem, gpus] = plan_report(root, path.stem, gpus)
        figures[path.stem] = planned_figure(reports[path.stem, gpus])
        changed += _rewrite(path, with_recipe_figure(text, figures[path.stem]))
    doc = root / TRAINING_DOC

    def report(name: str, gpus: int) -> str:
        return reports.get((name, gpus)) or plan_report(root, name, gpus)

    changed += _rewrite(doc, with_doc_figures(doc.read_text(), figures, report))
    return changed


def _rewrite(path: Path, text: str) -> list[Path]:
    if path.read_text() == text:
        return []
    path.write_text(text)
    return [path]


if __name__ == "__main__":
    for written in regenerate(Path.cwd()):
        print(f"updated {written}")
