"""What a training run tells its user: a progress bar, `metrics.jsonl`, TensorBoard, routing logs.

Per-step values stay on the device and are summed over a logging window; they are read (one host
sync) only every `train.log_every` steps. Losses are averaged over ranks at that point (each term
over the steps that reported it: pretraining tasks report different terms); the routing table
sums all ranks' tokens, kept apart per stage of the objective (the progress bar's routing success
is rank 0's). Collapse warnings are logged once per (layer, modality).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from limoe.config import MODALITIES, Config
from limoe.routing_report.statistics import RoutingAccumulator, collapses, format_summary_table

log = logging.getLogger("limoe.training.trainer")


class TrainingReporter:
    """`pairs_seen` counts the image-text pairs trained on since the run began, across resumes (it
    starts from the checkpoint's count); the bad-sample counts are this process's data loader's."""

    def __init__(self, config: Config, workdir: Path, rank: int, start_step: int, pairs_seen: int = 0):
        self.config = config
        self.pairs_seen = pairs_seen
        self.main = rank == 0
        self.routing: dict[Optional[str], RoutingAccumulator] = {}  # per stage (None: a run of one stage)
        self.warned: set[tuple[int, str]] = set()
        self.skipped_steps = 0
        self.evaluated = ""  # the last evaluation's headline numbers, kept on the progress line
        self._reset_window()
        self.bar = tqdm(total=config.train.steps, initial=start_step, desc="train", disable=not self.main,
                        dynamic_ncols=True, unit="step")
        self.metrics = (workdir / "metrics.jsonl").open("a") if self.main else None
        self.tensorboard = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def _reset_window(self) -> None:
        self.window_terms: dict[str, Tensor] = {}
        self.window_counts: dict[str, int] = {}  # steps that reported each term (stages report different ones)
        self.window_pairs = 0
        self.window_start = time.perf_counter()

    def step(self, step: int, terms: dict[str, Tensor], routing: list, lr: float, bad_samples, pairs: int,
             stage: Optional[str] = None) -> None:
        """Record one optimizer step of `stage`; log when the window is full."""
        for key, value in terms.items():
            self.window_terms[key] = self.window_terms.get(key, 0.0) + value.reshape(())
            self.window_counts[key] = self.window_counts.get(key, 0) + 1
        self.window_pairs += pairs
        self.pairs_seen += pairs
        if stage not in self.routing:
            self.routing[stage] = RoutingAccumulator(self.config.model.moe_layers)
        self.routing[stage].add(routing)
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
        success = self._routing_success()
        record = {
            "step": step, "lr": lr, "pairs_per_s": self.window_pairs / seconds,
            "pairs_seen": self.pairs_seen, **means, "skipped_steps": self.skipped_steps,
            "bad_samples": bad_samples.bad, "samples_read_this_process": bad_samples.seen,
            **{f"routing_success_{m}": s for m, s in success.items()},
        }
        self._reset_window()
        if not self.main:
            return
        self.bar.set_postfix_str(
            f"loss {means['loss']:.3f}  {record['pairs_per_s']:.0f} pairs/s  routed img/txt "
            + "/".join(f"{success[m]:.0%}" if success[m] is not None else "-" for m in MODALITIES) + self.evaluated
        )
        self._write(record, step)

    def _routing_success(self) -> dict:
        layers = [layer for routing in self.routing.values() for layer in routing.statistics()["layers"]]  # this rank
        success = {}
        for modality in MODALITIES:
            kept = sum(layer[modality]["tokens"] * (layer[modality]["routing_success"] or 0) for layer in layers)
            tokens = sum(layer[modality]["tokens"] for layer in layers)
            success[modality] = kept / tokens if tokens else None
        return success

    def _log_routing(self, step: int) -> None:
        """Each stage's routing since the last report, as its own record (`stage` names it)."""
        for stage in sorted(self.routing, key=str):  # every rank holds the same stages: same schedule
            routing = self.routing[stage]
            routing.all_reduce()  # every rank's tokens; all ranks reach this step together
            stats = routing.statistics()
            routing.reset()
            if not self.main or not stats["layers"]:
                continue
            self._write({"step": step, **({"stage": stage} if stage else {}), "routing": stats}, step)
            log.info("routing at step %d%s\n%s", step, f" ({stage})" if stage else "", format_summary_table(stats))
            for collapse in collapses(stats):
                if (collapse.block, collapse.modality) not in self.warned:
                    self.warned.add((collapse.block, collapse.modality))
                    log.warning("step %d: %s", step, collapse.message)

    def _write(self, record: dict, step: int) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tensorboard.add_scalar(f"train/{key}", value, step)
        for key, value in record.get("bad_samples", {}).items():
            self.tensorboard.add_scalar(f"data/bad_{key}", value, step)

    def evaluation(self, step: int, results: dict) -> None:
        """Record the evaluation at `step` ({set: metrics}): a metrics.jsonl line, TensorBoard
        scalars eval/<set>/<metric>, and its headline numbers on the progress line from now on."""
        if not self.main:
            return
        self._write({"step": step, "eval": results}, step)
        for name, metrics in results.items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"eval/{name}/{key}", value, step)
        headline = []
        if "zeroshot" in results:
            headline.append(f"zero-shot top-1 {results['zeroshot']['top1']:.1%}")
        if "retrieval" in results:
            headline.append(f"i→t R@1 {results['retrieval']['image_to_text_R@1']:.1%}")
        self.evaluated = "  " + "  ".join(headline)
        log.info("evaluation at step %d: %s", step, ", ".join(headline))

    def skipped(self, step: int) -> None:
        self.skipped_steps += 1
        if self.main:
            log.warning("step %d: the loss is not finite; skipped the update (%d skipped so far)",
                        step + 1, self.skipped_steps)

    def close(self) -> None:
        self.bar.close()
        if self.main:
            self.metrics.close()
            self.tensorboard.close()
