"""Figures quoted in the docs: a record is what its command measured, and every quote renders it."""

import json
import re
import sys
from pathlib import Path

import pytest

from limoe.errors import LimoeError
from limoe.figures import FIGURES, Figure, conditions, duration, main, measure, quoting_files, render_text, rendered_files

ROOT = Path(__file__).resolve().parents[1]


def test_every_quoted_figure_in_the_docs_is_its_record():
    """Re-render with `python -m limoe.figures` after recording a figure anew."""
    assert list(rendered_files(ROOT, FIGURES)) == []


def test_every_record_is_of_a_figure_and_every_figure_is_quoted():
    recorded = {path.stem for path in (ROOT / "docs" / "figures").glob("*.json")}
    quoted = {name for path in quoting_files(ROOT) for name in re.findall(r"<!-- figure ([\w-]+)\.", path.read_text())}
    assert recorded <= set(FIGURES) and quoted == set(FIGURES)


def _counting_figure(tmp_path):
    """A command that burns some CPU in a child and writes a result file into its scratch folder."""
    script = ("import json, subprocess, sys; subprocess.run([sys.executable, '-c', 'sum(range(3_000_000))']); "
              "json.dump({'answer': 42}, open(sys.argv[1] + '/out.json', 'w')); print('3 passed')")
    return Figure("counting", "count", lambda scratch: [sys.executable, "-c", script, str(scratch)],
                  lambda scratch, stdout: {**json.loads((scratch / "out.json").read_text()), "stdout": stdout.strip()},
                  {"sentence": lambda record: f"answer {record['results']['answer']} in {duration(record['wall_s'])}",
                   "table": lambda record: f"| answer |\n|---|\n| {record['results']['answer']} |"})


def test_a_record_holds_the_results_and_the_cpu_time_of_the_command_and_its_children(tmp_path):
    record = measure(_counting_figure(tmp_path), tmp_path, busy_window=0.2)
    assert record["results"] == {"answer": 42, "stdout": "3 passed"}
    assert record["figure"] == "counting" and record["command"] == "count" and record["cores"] >= 1
    # the grandchild's loop is counted: CPU time of the whole tree, not of the first process only
    assert record["user_s"] + record["system_s"] > 0 and {"date", "commit", "wall_s"} <= set(record)
    assert 0 <= record["busy_before"] <= 1


def test_a_failing_command_records_nothing():
    failing = Figure("failing", "fail", lambda scratch: [sys.executable, "-c", "raise SystemExit(3)"],
                     lambda scratch, stdout: {}, {})
    with pytest.raises(LimoeError, match="exited with status 3; nothing was recorded"):
        measure(failing, ROOT, busy_window=0.2)


def test_quotes_render_inline_and_as_blocks_and_keep_the_text_around_them(tmp_path):
    figure = _counting_figure(tmp_path)
    (tmp_path / "docs" / "figures").mkdir(parents=True)
    (tmp_path / "docs" / "figures" / "counting.json").write_text(json.dumps({"results": {"answer": 7}, "wall_s": 162.4}))
    text = ("It gave <!-- figure counting.sentence -->old<!-- /figure -->, as expected.\n\n"
            "<!-- figure counting.table -->\n| stale |\n<!-- /figure -->\nafter\n")
    assert render_text(text, tmp_path, {"counting": figure}) == (
        "It gave <!-- figure counting.sentence -->answer 7 in 2 min 42 s<!-- /figure -->, as expected.\n\n"
        "<!-- figure counting.table -->\n| answer |\n|---|\n| 7 |\n<!-- /figure -->\nafter\n")
    assert render_text(text, tmp_path / "elsewhere", {"counting": figure}).startswith(
        "It gave <!-- figure counting.sentence -->(not measured yet: `python -m limoe.figures record counting`)")
    with pytest.raises(LimoeError, match="quote figure counting.nothing"):
        render_text("<!-- figure counting.nothing -->x<!-- /figure -->", tmp_path, {"counting": figure})


def test_conditions_say_idle_below_a_quarter_of_the_cpus_busy():
    record = {"date": "2026-12-06", "cores": 2}
    assert conditions({**record, "busy_before": 0.03}) == (
        "2026-12-06, 2-core CPU, idle (3% of the CPUs busy in the 5 s before the start)")
    assert conditions({**record, "busy_before": 0.5}).startswith("2026-12-06, 2-core CPU, loaded (50% of the CPUs")


def test_durations_are_rounded_to_the_second():
    assert [duration(s) for s in (0.4, 48.0, 59.6, 162.4, 3600)] == ["0 s", "48 s", "1 min 0 s", "2 min 42 s",
                                                                      "60 min 0 s"]


def test_recording_an_unknown_figure_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["record", "nothing"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
