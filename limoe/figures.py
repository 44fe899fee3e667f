"""Figures the docs quote, each from one command: measured once, rendered wherever it is quoted.

A timing or a score in README.md or docs/ that comes from running something stands between
`<!-- figure NAME.VIEW -->` and `<!-- /figure -->`, and is rendered from `docs/figures/NAME.json`.
That record is written by `python -m limoe.figures record NAME`, which runs the figure's command
and measures it: wall time, the user and system CPU time of the command and all its children, the
machine's cores and the share of its CPUs busy in the seconds before the start (so "idle" or
"loaded" is a measured fact, not a recollection), the date and the commit. `python -m limoe.figures` re-renders every
quote from the records, and a test fails when a quote differs from its record, so two places can
never quote one figure differently and no figure is left without its command and conditions.

Run both from the repository root. Re-record a figure after a change that moves it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from limoe.errors import LimoeError
from limoe.files import atomic_write

RECORDS = Path("docs/figures")  # relative to the repository root
# A quote inline in a sentence, or a block (the markers on lines of their own, e.g. around a table).
QUOTE = re.compile(r"(?P<open><!-- figure (?P<name>[\w-]+)\.(?P<view>[\w-]+) -->)(?P<body>.*?)(?P<close><!-- /figure -->)",
                   re.DOTALL)
IDLE_SHARE = 0.25  # below this share of the CPUs busy just before the start, the machine counts as idle
BUSY_WINDOW_S = 5.0  # how long that share is sampled


@dataclass(frozen=True)
class Figure:
    """How to measure one figure and the ways the docs quote it.

    `command(scratch)` is the argv to run from the repository root, with a fresh scratch folder for
    anything it writes; `results(scratch, stdout)` reads what the record keeps besides the times;
    `views` render the record as the docs quote it (a sentence, a table)."""

    name: str
    what: str  # the command as a reader would type it, quoted beside the figure
    command: Callable[[Path], list[str]]
    results: Callable[[Path, str], dict]
    views: dict[str, Callable[[dict], str]]


def duration(seconds: float) -> str:
    """'2 min 42 s' (rounded to the second), or '48 s' under a minute."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def conditions(record: dict) -> str:
    """'2026-12-06, 2-core CPU, idle (3% of the CPUs busy in the 5 s before the start)'."""
    state = "idle" if record["busy_before"] < IDLE_SHARE else "loaded"
    return (f"{record['date']}, {record['cores']}-core CPU, {state} ({record['busy_before']:.0%} of the CPUs busy "
            f"in the {BUSY_WINDOW_S:.0f} s before the start)")


def busy_share(seconds: float = BUSY_WINDOW_S) -> float:
    """The share of all CPUs' time that was not idle over the next `seconds` (Linux /proc/stat).
    Unlike the load average, which trails the last minute, it says whether other work runs now."""

    def idle_and_total() -> tuple[int, int]:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle_before, total_before = idle_and_total()
    time.sleep(seconds)
    idle_after, total_after = idle_and_total()
    return 1.0 - (idle_after - idle_before) / max(total_after - total_before, 1)


def times(record: dict) -> str:
    """'2 min 42 s wall, 4 min 50 s user, 12 s system'."""
    return f"{duration(record['wall_s'])} wall, {duration(record['user_s'])} user, {duration(record['system_s'])} system"


def measure(figure: Figure, root: Path, busy_window: float = BUSY_WINDOW_S) -> dict:
    """Run the figure's command from `root` in a fresh scratch folder and return its record."""
    with tempfile.TemporaryDirectory(prefix=f"limoe-figure-{figure.name}-") as scratch:
        argv = figure.command(Path(scratch))
        busy_before = busy_share(busy_window)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        finished = subprocess.run(argv, cwd=root, stdout=subprocess.PIPE, text=True)
        wall = time.monotonic() - started
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if finished.returncode != 0:
            raise LimoeError(f"figure {figure.name}: `{' '.join(argv)}` exited with status {finished.returncode}; "
                             f"nothing was recorded, fix the command's failure first.")
        results = figure.results(Path(scratch), finished.stdout)
    return {"figure": figure.name, "command": figure.what, "date": datetime.date.today().isoformat(),
            "commit": _commit(root), "cores": os.cpu_count(), "busy_before": round(busy_before, 3),
            "wall_s": round(wall, 2), "user_s": round(children_after.ru_utime - children_before.ru_utime, 2),
            "system_s": round(children_after.ru_stime - children_before.ru_stime, 2), "results": results}


def _commit(root: Path) -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load_record(root: Path, name: str) -> Optional[dict]:
    """The record of figure `name`, or None before it was first recorded."""
    path = root / RECORDS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def render_text(text: str, root: Path, figures: dict[str, Figure]) -> str:
    """`text` with every quoted figure re-rendered from its record."""

    def rendered(match: re.Match) -> str:
        name, view = match["name"], match["view"]
        if name not in figures or view not in figures[name].views:
            raise LimoeError(f"the docs quote figure {name}.{view}, which limoe.figures does not define; "
                             f"fix the marker or define the view.")
        record = load_record(root, name)
        body = (figures[name].views[view](record) if record is not None
                else f"(not measured yet: `python -m limoe.figures record {name}`)")
        if match["body"].startswith("\n"):
            body = f"\n{body.strip(chr(10))}\n"
        return match["open"] + body + match["close"]

    return QUOTE.sub(rendered, text)


def quoting_files(root: Path) -> list[Path]:
    """The files that may quote figures."""
    return [root / "README.md", root / "data_shards" / "README.md", *sorted((root / "docs").glob("*.md"))]


def rendered_files(root: Path, figures: dict[str, Figure]) -> dict[Path, str]:
    """Each file whose quotes differ from their records, with its text re-rendered."""
    rendered = {}
    for path in quoting_files(root):
        text = path.read_text(encoding="utf-8")
        if (new := render_text(text, root, figures)) != text:
            rendered[path] = new
    return rendered


def render_all(root: Path, figures: dict[str, Figure]) -> list[Path]:
    """Rewrite every stale quote from its record; returns the files rewritten."""
    rendered = rendered_files(root, figures)
    for path, text in rendered.items():
        path.write_text(text, encoding="utf-8")
    return list(rendered)


# The figures the docs quote.

def _demo_results(scratch: Path, stdout: str) -> dict:
    retrieval = json.loads((scratch / "demo" / "final_metrics.json").read_text(encoding="utf-8"))["retrieval"]
    return {key: retrieval[key] for key in ("images", "image_to_text_R@1", "image_to_text_R@5",
                                            "text_to_image_R@1", "text_to_image_R@5")}


def _demo_time(record: dict) -> str:
    return (f"took {times(record)} on {conditions(record)}; `python -m limoe.figures record demo` measures it, "
            f"running `limoe train` in a fresh workdir, the final evaluation included")


def _demo_retrieval(record: dict) -> str:
    r = record["results"]
    return ("| | R@1 | R@5 |\n|---|---|---|\n"
            f"| image→text | {r['image_to_text_R@1']:.1%} | {r['image_to_text_R@5']:.1%} |\n"
            f"| text→image | {r['text_to_image_R@1']:.1%} | {r['text_to_image_R@5']:.1%} |")


def _run_time(included: str) -> Callable[[dict], str]:
    """The time view of a demo figure whose command trains and then evaluates: `included` names the
    evaluations its times include."""
    return lambda record: (f"took {times(record)} on {conditions(record)}, {included} included; "
                           f"`python -m limoe.figures record {record['figure']}` measures it")


AUDIO_HELDOUT = "data_shards/audio_heldout"


def _audio_demo_command(scratch: Path) -> list[str]:
    """The audio demo's training, then `limoe eval` of its audio on the unheard instruments."""
    limoe, run = f"{shlex.quote(sys.executable)} -m limoe", shlex.quote(str(scratch / "run"))
    evaluate = (f"{limoe} eval {{0}} --modality audio --checkpoint {run}/model.safetensors --data {AUDIO_HELDOUT} "
                f"--device cpu --output {shlex.quote(str(scratch))}/{{0}}.json")
    return ["bash", "-c", f"{limoe} train --config audio-demo --workdir {run} && {evaluate.format('retrieval')} "
                          f"&& {evaluate.format('zeroshot')}"]


def _audio_demo_results(scratch: Path, stdout: str) -> dict:
    read = lambda path: json.loads(path.read_text(encoding="utf-8"))  # noqa: E731
    audio, zeroshot = read(scratch / "retrieval.json"), read(scratch / "zeroshot.json")
    images = read(scratch / "run" / "final_metrics.json")["retrieval"]
    routing = [json.loads(line) for line in (scratch / "run" / "metrics.jsonl").read_text().splitlines()]
    by_task = [row for row in routing if "routing_by_task" in row][-1]
    return {
        "audio": {key: audio[key] for key in ("audio_to_text_R@1", "audio_to_text_R@5", "text_to_audio_R@1",
                                              "text_to_audio_R@5", "clips")},
        "zeroshot": {key: zeroshot[key] for key in ("top1", "top5", "classes")},
        "images": {key: images[key] for key in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1",
                                                "text_to_image_R@5")},
        "routing_step": by_task["step"],
        "routing": {task: [{modality: {"share": layer[modality]["share"], "dropped": layer[modality]["dropped"]}
                            for modality in ("image", "text", "audio") if layer[modality]["tokens"]}
                           for layer in record["layers"]]
                    for task, record in by_task["routing_by_task"].items()},
        "blocks": [layer["block"] for layer in by_task["routing"]["layers"]],
    }


def _audio_demo_retrieval(record: dict) -> str:
    r, z, clips = record["results"]["audio"], record["results"]["zeroshot"], record["results"]["audio"]["clips"]
    i = record["results"]["images"]
    return ("| held out | R@1 | R@5 | chance R@1 / R@5 |\n|---|---|---|---|\n"
            f"| audio→text ({clips} clips) | {r['audio_to_text_R@1']:.1%} | {r['audio_to_text_R@5']:.1%} | "
            f"{1 / clips:.1%} / {5 / clips:.1%} |\n"
            f"| text→audio | {r['text_to_audio_R@1']:.1%} | {r['text_to_audio_R@5']:.1%} | "
            f"{1 / clips:.1%} / {5 / clips:.1%} |\n"
            f"| image→text (343 emoji) | {i['image_to_text_R@1']:.1%} | {i['image_to_text_R@5']:.1%} | 0.3% / 1.5% |\n"
            f"| text→image | {i['text_to_image_R@1']:.1%} | {i['text_to_image_R@5']:.1%} | 0.3% / 1.5% |\n\n"
            f"Zero-shot instrument family of the unheard clips: top-1 {z['top1']:.1%}, top-5 {z['top5']:.1%} "
            f"(chance {1 / z['classes']:.1%} and {5 / z['classes']:.1%}).")


def _audio_demo_routing(record: dict) -> str:
    results = record["results"]
    rows = ["| task | block | modality | tokens per expert (E0 … E3) | dropped |", "|---|---|---|---|---|"]
    for task, layers in results["routing"].items():
        for block, layer in zip(results["blocks"], layers):
            for modality, numbers in layer.items():
                shares = " / ".join(f"{share:.0%}" for share in numbers["share"])
                rows.append(f"| {task} | {block} | {modality} | {shares} | {numbers['dropped']:.1%} |")
    return "\n".join(rows) + (f"\n\n(the routing of the training steps in the window ending at step {results['routing_step']} "
                               f"— `train.routing_stats_every` steps — from the run's `metrics.jsonl`)")


VIDEO_HELDOUT = "data_shards/video_heldout"


def _video_demo_command(scratch: Path) -> list[str]:
    """The video demo's training, then `limoe eval zeroshot` of the held-out directions from the real
    clips and from their centre frames repeated (`--still-frame`)."""
    limoe, run, out = f"{shlex.quote(sys.executable)} -m limoe", shlex.quote(str(scratch / "run")), shlex.quote(str(scratch))
    evaluate = (f"{limoe} eval zeroshot --modality video --checkpoint {run}/model.safetensors --data {VIDEO_HELDOUT} "
                f"--templates {VIDEO_HELDOUT}/templates.txt --device cpu")
    return ["bash", "-c", f"{limoe} train --config video-demo --workdir {run} && {evaluate} --output {out}/real.json "
                          f"&& {evaluate} --still-frame --output {out}/still.json"]


def _video_demo_results(scratch: Path, stdout: str) -> dict:
    real, still = (json.loads((scratch / f"{kind}.json").read_text(encoding="utf-8")) for kind in ("real", "still"))
    return {"real_top1": real["top1"], "still_top1": still["top1"], "classes": real["classes"], "clips": real["samples"]}


def _video_demo_directions(record: dict) -> str:
    r = record["results"]
    return ("| held-out direction, zero-shot | top-1 |\n|---|---|\n"
            f"| real clips ({r['clips']}) | {r['real_top1']:.1%} |\n"
            f"| centre frame repeated (`--still-frame`) | {r['still_top1']:.1%} |\n"
            f"| chance | {1 / r['classes']:.1%} |")


def _test_results(scratch: Path, stdout: str) -> dict:
    summary = [line for line in stdout.splitlines() if re.search(r"\d+ passed", line)]
    return {"summary": re.sub(r" in [\d.]+s.*$", "", summary[-1].strip("= ")) if summary else stdout.strip()[-200:]}


def _test_time(record: dict) -> str:
    return (f"{record['results']['summary']} in {times(record)} ({conditions(record)}; "
            f"`python -m limoe.figures record tests`)")


def _start_up(record: dict) -> str:
    return (f"{record['user_s']:.2f} s user, {record['wall_s']:.2f} s wall ({conditions(record)}; "
            f"`python -m limoe.figures record {record['figure']}`)")


def _command(*args: str) -> Callable[[Path], list[str]]:
    """The installed `limoe` command beside this interpreter, with `args`."""
    return lambda scratch: [str(Path(sys.executable).parent / "limoe"), *args]


def _nothing(scratch: Path, stdout: str) -> dict:
    return {}


FIGURES = {figure.name: figure for figure in (
    Figure("help", "limoe --help", _command("--help"), _nothing, {"time": _start_up}),
    Figure("eval-help", "limoe eval --help", _command("eval", "--help"), _nothing, {"time": _start_up}),
    Figure("info", "limoe info limoe-tiny", _command("info", "limoe-tiny"), _nothing, {"time": _start_up}),
    Figure("demo", "limoe train", lambda scratch: [sys.executable, "-m", "limoe", "train", "--workdir",
                                                   str(scratch / "demo")],
           _demo_results, {"time": _demo_time, "retrieval": _demo_retrieval}),
    Figure("audio-demo", "limoe train --config audio-demo; limoe eval retrieval|zeroshot --modality audio",
           _audio_demo_command, _audio_demo_results,
           {"time": _run_time("the two `limoe eval` runs"), "retrieval": _audio_demo_retrieval,
            "routing": _audio_demo_routing}),
    Figure("video-demo", f"limoe train --config video-demo; limoe eval zeroshot --modality video --data {VIDEO_HELDOUT} "
                         f"--templates {VIDEO_HELDOUT}/templates.txt [--still-frame]",
           _video_demo_command, _video_demo_results,
           {"time": _run_time("the two `limoe eval zeroshot` runs"), "directions": _video_demo_directions}),
    Figure("tests", "python -m pytest", lambda scratch: [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
           _test_results, {"time": _test_time}),
)}


def _render(root: Path) -> None:
    for path in render_all(root, FIGURES):
        print(f"rendered {path}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m limoe.figures", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    record = commands.add_parser("record", help="run a figure's command, save its record and re-render the docs")
    record.add_argument("names", nargs="+", choices=sorted(FIGURES))
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        for name in args.names if args.command == "record" else ():
            path = root / RECORDS / f"{name}.json"
            measured = json.dumps(measure(FIGURES[name], root), indent=1) + "\n"
            atomic_write(path, lambda tmp: tmp.write_text(measured, encoding="utf-8"))
            print(f"recorded {path}", file=sys.stderr)
            _render(root)  # before the next figure's command runs: the test suite checks the quotes
        _render(root)
    except LimoeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
