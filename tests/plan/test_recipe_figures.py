"""The per-GPU memory the shipped recipes and docs/TRAINING.md quote is what `limoe plan` prints
for them today (regenerate with `python -m limoe.plan.recipe_figures`). limoe-s32 is checked in
every run; the larger models take a minute each on a CPU to measure, so they are marked slow."""

import contextlib
import io
from pathlib import Path

import pytest

from limoe.cli import main
from limoe.plan import recipe_figures

ROOT = Path(__file__).resolve().parents[2]
FAST = {"limoe-s32"}


def _plan_output(recipe: Path, gpus: int) -> str:
    """`limoe plan` for the recipe, run from the repository root as the docs show it."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["plan", "--config", str(recipe.relative_to(ROOT)), "--gpus", str(gpus), "--gpu-memory",
                     str(recipe_figures.GPU_MEMORY_GIB)]) == 0
    return stdout.getvalue()


@pytest.mark.parametrize("recipe", [
    pytest.param(path, id=path.stem, marks=() if path.stem in FAST else pytest.mark.slow)
    for path in recipe_figures.recipe_paths(ROOT)
])
def test_recipe_and_docs_quote_what_limoe_plan_prints(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = recipe.read_text()
    gpus = recipe_figures.recipe_gpus(text)
    output = _plan_output(recipe, gpus)
    (total,) = [line.split()[1] for line in output.splitlines() if line.split()[:1] == ["total"]]
    doc = (ROOT / recipe_figures.TRAINING_DOC).read_text()
    assert recipe_figures.quoted_recipe_figure(text) == total
    assert recipe_figures.quoted_doc_figures(doc)[recipe.stem] == total
    assert "settings to use: no change" in output  # each recipe is at the setting the plan recommends
    shown = recipe_figures.quoted_doc_reports(doc).get((recipe.stem, gpus))
    assert shown is None or shown + "\n" == output


def test_every_recipe_is_in_the_docs_table():
    doc = (ROOT / recipe_figures.TRAINING_DOC).read_text()
    assert set(recipe_figures.quoted_doc_figures(doc)) == {path.stem for path in recipe_figures.recipe_paths(ROOT)}


def test_the_gpus_of_a_recipe_are_those_of_its_launch_line():
    gpus = {path.stem: recipe_figures.recipe_gpus(path.read_text()) for path in recipe_figures.recipe_paths(ROOT)}
    assert gpus == {"limoe-s32": 8, "limoe-b32": 8, "limoe-b16": 8, "limoe-l16": 8, "limoe-h14": 32}  # h14: 4 nodes of 8


def test_regenerating_replaces_the_figures_and_reports_and_nothing_else():
    recipe = "# deepspeed --num_gpus 8 …\n# B/16. `limoe plan` on 80 GiB GPUs: 44.0 GiB per GPU.\nmodel: limoe-b16  # 44.0\n"
    assert recipe_figures.with_recipe_figure(recipe, "45.3") == recipe.replace("GPUs: 44.0", "GPUs: 45.3")
    doc = ("| recipe | GPUs | plan |\n|---|---|---|\n| limoe-b16 | 8 | 44.0 |\n| limoe-s32 | 8 | 25.8 |\n\n"
           "```\n$ limoe plan --config configs/train/limoe-b16.yaml --gpus 8 --gpu-memory 80\nold\nreport\n```\n"
           "44.0 in prose stays.\n")
    rewritten = recipe_figures.with_doc_figures(doc, {"limoe-b16": "45.3", "limoe-s32": "27.1"},
                                                lambda name, gpus: f"{name} on {gpus}")
    assert rewritten == (doc.replace("| 8 | 44.0 |", "| 8 | 45.3 |").replace("25.8", "27.1")
                         .replace("old\nreport", "limoe-b16 on 8"))
