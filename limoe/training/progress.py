"""What a training run tells its user: a progress line, `metrics.jsonl`, TensorBoard or W&B, routing logs.

Per-step values stay on the device and are summed over a logging window; they are read (one host
sync) only every `train.log_every` steps. Losses are averaged over ranks at that point (each term
over the steps that reported it: pretraining tasks and co-training's tasks report different
terms); the routing table sums all ranks' tokens, kept apart per stage of the objective (the
progress bar's routing success is rank 0's). Collapse warnings are logged once per (layer, modality).

Co-training logs each task's terms as `<task>/<term>`, averaged over the steps that ran the task,
and routing statistics for each task besides those of all tasks together (within each stage).

The progress line (open_clip's `Train Epoch … Data (t) Batch (t) LR` line): on a terminal the
fields follow the progress bar; without one (a cluster's log file) each `log_every` step prints
the line whole, with the step, so the file holds lines and not carriage-return redraws. The
reporter is a context manager: inside it log lines (collapse warnings, …) are written above
the bar instead of glued to it, and leaving it, however, closes the bar first, so an error
printed after it stands on its own line and stays the last one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from limoe.config import Config
from limoe.files import open_for_append
from limoe.modalities import modality
from limoe.routing_report.statistics import RoutingAccumulator, collapses, format_summary_table
from limoe.training.device_batches import WaitClock
from limoe.training.report_to import ScalarSinks, scalars
from limoe.training.step import StepOutcome
from limoe.training.workdir import METRICS

log = logging.getLogger(__name__)


class TrainingReporter:
    """`pairs_seen` counts the samples trained on since the run began, across resumes (it starts
    from the checkpoint's count); co-training also counts each task's steps and samples
    (`tasks_seen`, likewise resumed). The bad-sample counts are this process's data loaders'."""

    def __init__(self, config: Config, workdir: Path, rank: int, start_step: int, pairs_seen: int = 0,
                 tasks_seen: Optional[dict] = None, data_clock: Optional[WaitClock] = None):
        self.config = config
        self.data_clock = data_clock or WaitClock()  # the step functions' batch waits
        self.pairs_seen = pairs_seen
        self.tasks_seen = {task.name: {"steps": 0, "samples": 0, **(tasks_seen or {}).get(task.name, {})}
                           for task in config.tasks}
        self.main = rank == 0
        self.task_names = [task.name for task in config.tasks]
        self.routing: dict[Optional[str], RoutingAccumulator] = {}  # per stage (None: a run of one stage)
        self.task_routing: dict[Optional[str], dict[str, RoutingAccumulator]] = {}  # per stage, per task
        self.warned: set[tuple[int, str]] = set()
        self.skipped_steps = 0
        self.evaluated = ""  # the last evaluation's headline numbers, kept on the progress line
        self._reset_window()
        self.stream = sys.stderr
        self.terminal = self.stream.isatty()
        self.bar = tqdm(total=config.train.steps, initial=start_step, desc="train", file=self.stream,
                        disable=not (self.main and self.terminal), dynamic_ncols=True, unit="step")
        self.metrics = open_for_append(workdir / METRICS) if self.main else None
        self.sinks = ScalarSinks(config, workdir) if self.main else None

    def __enter__(self) -> "TrainingReporter":
        self._log_above_the_bar = contextlib.ExitStack()
        self._log_above_the_bar.enter_context(logging_redirect_tqdm())  # the root logger's console output
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._log_above_the_bar.close()
        self.close(failed=kind is not None)

    def _reset_window(self) -> None:
        self.window_terms: dict[str, Tensor] = {}
        self.window_counts: dict[str, int] = {}  # steps that reported each term (stages, tasks report their own)
        self.window_pairs = 0
        self.window_steps = 0
        self.window_start = time.perf_counter()
        self.data_clock.take()

    def progress(self) -> dict:
        """The counters a checkpoint keeps, given back to the reporter of a resumed run."""
        return {"pairs_seen": self.pairs_seen, **({"tasks": self.tasks_seen} if self.tasks_seen else {})}

    def step(self, step: int, outcome: StepOutcome, lr: float, bad_samples, stage: Optional[str] = None) -> None:
        """Record one optimizer step of `stage`; log when the window is full. The routing of each
        forward pass counts for all tasks together and, when co-training, for its own task."""
        terms, pairs = outcome.terms, outcome.samples
        for task, samples in outcome.task_samples.items():
            self.tasks_seen[task]["steps"] += 1
            self.tasks_seen[task]["samples"] += samples
        for key, value in terms.items():
            self.window_terms[key] = self.window_terms.get(key, 0.0) + value.reshape(())
            self.window_counts[key] = self.window_counts.get(key, 0) + 1
        self.window_pairs += pairs
        self.window_steps += 1
        self.pairs_seen += pairs
        if stage not in self.routing:
            layers = self.config.model.moe_layers
            self.routing[stage] = RoutingAccumulator(layers, self.config.model.modalities)
            self.task_routing[stage] = {task: RoutingAccumulator(layers, self.config.model.modalities)
                                        for task in self.task_names}
        for task, records in outcome.routing:
            if task is not None:
                self.task_routing[stage][task].add(records)
            self.routing[stage].add(records)
        self.bar.update(1)
        last = step == self.config.train.steps
        if step % self.config.train.log_every == 0 or last:
            self._log(step, lr, bad_samples)
        if step % self.config.train.routing_stats_every == 0 or last:
            self._log_routing(step)

    def _window_means(self) -> dict[str, float]:
        names = sorted(self.window_terms)
        values = torch.stack([self.window_terms[n] / self.window_counts[n] for n in names])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        return dict(zip(names, values.tolist()))

    def _log(self, step: int, lr: float, bad_samples) -> None:
        means = self._window_means()
        seconds = time.perf_counter() - self.window_start
        data_seconds = self.data_clock.take()
        success = self._routing_success()
        record = {
            "step": step, "lr": lr, "pairs_per_s": self.window_pairs / seconds,
            "data_s": data_seconds / self.window_steps, "batch_s": seconds / self.window_steps,
            "pairs_seen": self.pairs_seen, **({"tasks_seen": self.tasks_seen} if self.tasks_seen else {}), **means,
            "skipped_steps": self.skipped_steps,
            "bad_samples": bad_samples.bad, "samples_read_this_process": bad_samples.seen,
            **{f"routing_success_{m}": s for m, s in success.items()},
        }
        self._reset_window()
        if not self.main:
            return
        fields = self._progress_fields(record, means, success)
        if self.terminal:
            self.bar.set_postfix_str(fields)
        else:
            total = self.config.train.steps
            print(f"Train step {step}/{total} ({step / total:.0%})  {fields}", file=self.stream, flush=True)
        self._write(record, step, {
            **scalars({key: value for key, value in record.items() if key not in ("step", "bad_samples")}, "train"),
            **{f"data/bad_{reason}": count for reason, count in record["bad_samples"].items()},
        })

    def _progress_fields(self, record: dict, means: dict[str, float], success: dict) -> str:
        """The window's timings (per step: waiting for data, whole step), LR, losses, throughput,
        routing success and the last evaluation's headline, as open_clip's log line has them."""
        tasks = "".join(f"  {name} {means[f'{name}/loss']:.3f}" for name in self.task_names if f"{name}/loss" in means)
        unit = "samples" if self.task_names else "pairs"
        routed = "/".join(f"{success[m]:.0%}" if success[m] is not None else "-" for m in success)
        labels = "/".join(modality(m).short_name for m in success)
        return (f"Data (t) {record['data_s']:.3f}s  Batch (t) {record['batch_s']:.3f}s  LR {record['lr']:.3e}  "
                f"loss {means['loss']:.3f}{tasks}  {record['pairs_per_s']:.0f} {unit}/s  routed {labels} {routed}"
                + self.evaluated)

    def _routing_success(self) -> dict:
        layers = [layer for routing in self.routing.values() for layer in routing.statistics()["layers"]]  # this rank
        success = {}
        for modality in self.config.model.modalities:
            kept = sum(layer[modality]["tokens"] * (layer[modality]["routing_success"] or 0) for layer in layers)
            tokens = sum(layer[modality]["tokens"] for layer in layers)
            success[modality] = kept / tokens if tokens else None
        return success

    def _log_routing(self, step: int) -> None:
        """Each stage's routing since the last report, as its own record (`stage` names it), with
        each task's beside all tasks' together when co-training."""
        for stage in sorted(self.routing, key=str):  # every rank holds the same stages: same schedule
            stats = self._reduced_statistics(self.routing[stage])
            by_task = {task: self._reduced_statistics(accumulator)  # the same order on every rank
                       for task, accumulator in self.task_routing[stage].items()}
            if not self.main or not stats["layers"]:
                continue
            within = f"/{stage}" if stage else ""
            self._write({"step": step, **({"stage": stage} if stage else {}), "routing": stats,
                         **({"routing_by_task": by_task} if by_task else {})}, step,
                        {**scalars(stats, f"routing{within}"), **scalars(by_task, f"routing_by_task{within}")})
            during = f" ({stage})" if stage else ""
            log.info("routing at step %d%s\n%s", step, during, format_summary_table(stats))
            for task, task_stats in by_task.items():
                log.info("routing of task %s%s\n%s", task, during, format_summary_table(task_stats))
            for collapse in collapses(stats):
                if (collapse.block, collapse.modality) not in self.warned:
                    self.warned.add((collapse.block, collapse.modality))
                    log.warning("step %d: %s", step, collapse.message)

    @staticmethod
    def _reduced_statistics(accumulator: RoutingAccumulator) -> dict:
        """This window's statistics over every rank's tokens (all ranks call it together); then reset."""
        accumulator.all_reduce()
        stats = accumulator.statistics()
        accumulator.reset()
        return stats

    def _write(self, record: dict, step: int, values: dict[str, float]) -> None:
        """`record` as a metrics.jsonl line and `values`, its scalars, to `train.report_to`."""
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        self.sinks.log(values, step)

    def evaluation(self, step: int, results: dict) -> None:
        """Record the evaluation at `step` ({set: metrics}): a metrics.jsonl line, scalars
        eval/<set>/<metric>, and its headline numbers on the progress line from now on."""
        if not self.main:
            return
        self._write({"step": step, "eval": results}, step, scalars(results, "eval"))
        headline = []
        if "zeroshot" in results:
            headline.append(f"zero-shot top-1 {results['zeroshot']['top1']:.1%}")
        if "retrieval" in results:
            headline.append(f"i→t R@1 {results['retrieval']['image_to_text_R@1']:.1%}")
        audio = results.get("audio", {})
        if "zeroshot" in audio:
            headline.append(f"audio zero-shot top-1 {audio['zeroshot']['top1']:.1%}")
        if "retrieval" in audio:
            headline.append(f"a→t R@1 {audio['retrieval']['audio_to_text_R@1']:.1%}")
        self.evaluated = "  " + "  ".join(headline)
        log.info("evaluation at step %d: %s", step, ", ".join(headline))

    def skipped(self, step: int) -> None:
        self.skipped_steps += 1
        if self.main:
            log.warning("step %d: the loss is not finite; skipped the update (%d skipped so far)",
                        step + 1, self.skipped_steps)

    def close_bar(self) -> None:
        """Training is over: the bar ends its line before the final report prints below it."""
        self.bar.close()

    def final(self, metrics: dict) -> None:
        """The end-of-run report (final_metrics.json's numbers) as scalars final/… at the last step."""
        if self.main:
            self.sinks.log(scalars(metrics, "final"), self.config.train.steps)

    def close(self, failed: bool = False) -> None:
        self.close_bar()  # (again: closing a closed bar does nothing)
        if self.main:
            self.metrics.close()
            self.sinks.close(failed)
