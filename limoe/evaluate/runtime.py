"""What every evaluation does around its loop: pick the device, load the model, switch it to
inference, set the precision, and report the numbers on stdout and in a JSON file."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from limoe.checkpoints import load_model
from limoe.checkpoints.training import checkpoint_sources
from limoe.files import atomic_write, check_output_file, refuse_overwriting_inputs
from limoe.distributed import resolve_device
from limoe.errors import LimoeError
from limoe.model.tower import Limoe


def check_report_output(output: Optional[str], checkpoint: Path, *inputs: Optional[str | Path]) -> None:
    """Before any work: the metrics file `output` (if any) can be written and replaces nothing the
    evaluation reads (the checkpoint's files and `inputs`: data, class names, templates)."""
    if output is not None:
        check_output_file(output, "--output")
        refuse_overwriting_inputs({"--output": output}, [*checkpoint_sources(checkpoint), *inputs])


def load_for_eval(checkpoint: Path, device: str, capacity_factor: Optional[str]) -> Limoe:
    """The checkpoint's model on the resolved device, with the eval capacity factor applied."""
    model, _ = load_model(checkpoint, resolve_device(device), capacity_factor)
    return model


@contextlib.contextmanager
def inference(model: Limoe) -> Iterator[torch.device]:
    """Eval mode (no router noise, eval capacity), no autograd and, on CUDA, bf16 autocast, as in
    training; the model's previous mode comes back afterwards, so the trainer can call evaluations
    on its live model. Yields the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.no_grad(), autocast:
            yield device
    finally:
        model.train(was_training)


def nothing_read(batches, needs: str) -> LimoeError:
    """The error for an evaluation set that gave no usable sample, with the loader's skip counts
    (a shard or folder loader's `bad_samples`) when it keeps them."""
    counter = getattr(batches, "bad_samples", None)
    counts = f": {counter.summary()}" if counter is not None else ""
    return LimoeError(f"no usable sample in the evaluation set{counts}; {needs}.")


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):  # counts by reason
        return ", ".join(f"{key} {count}" for key, count in value.items()) or "none"
    return str(value)


def report(title: str, metrics: dict, output: Optional[str]) -> None:
    """Print `metrics` one per line under `title`, values in one column, and, with `output`, write
    them as JSON."""
    print(title)
    width = max(map(len, metrics), default=0)
    for name, value in metrics.items():
        print(f"  {name:{width}s}  {_format(value)}")
    if output is not None:
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write(Path(output), lambda tmp: tmp.write_text(text))
