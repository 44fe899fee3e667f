"""Where a run's numbers go besides metrics.jsonl: `train.report_to` (open_clip's `--report-to`),
TensorBoard event files in `workdir/tensorboard` and/or a Weights & Biases run.

Both get the same scalars, each named by its path in the record it comes from (`scalars`):
`train/<key>` and `data/bad_<reason>` every `log_every` steps, `routing/[<stage>/]block<N>/<modality>/<stat>`
(and `routing_by_task/[<stage>/]<task>/…` when co-training) every `routing_stats_every` steps,
`eval/<set>/<metric>` at each evaluation during training, and `final/…` (held-out retrieval and
routing of the exported model) at the last step. Lists (per-expert shares) stay in metrics.jsonl.

The W&B run keeps its id in `workdir/wandb_run_id`, so a resumed run continues the same W&B run;
W&B ignores values for steps it already has, so for the steps between the checkpoint and a kill
it keeps the killed run's values (metrics.jsonl keeps the resumed run's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from limoe.config import Config, to_dict
from limoe.errors import LimoeError
from limoe.files import atomic_write

WANDB_RUN_ID = "wandb_run_id"


def scalars(value: object, prefix: str) -> dict[str, float]:
    """Every number `value` holds (nested mappings), named `prefix/key/…`; a routing statistics'
    `layers` list becomes `block<N>/…` (N the MoE block). Other lists, text and null are left out."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: value}
    if not isinstance(value, dict):
        return {}
    found = {}
    for key, item in value.items():
        if key == "layers" and isinstance(item, list):
            for layer in item:
                numbers = {k: v for k, v in layer.items() if k != "block"}
                found.update(scalars(numbers, f"{prefix}/block{layer['block']}"))
        else:
            found.update(scalars(item, f"{prefix}/{key}"))
    return found


def check_report_to(config: Config) -> None:
    """Refuse, before anything is built, a `train.report_to` whose library is not installed."""
    if "wandb" in config.train.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise LimoeError("train.report_to names wandb, which is not installed; run `pip install 'limoe[wandb]'` "
                             "(or `pip install wandb`), or leave wandb out of train.report_to.") from None


class ScalarSinks:
    """The writers `train.report_to` names, on process 0; `log` sends one step's scalars to each."""

    def __init__(self, config: Config, workdir: Path):
        self.tensorboard = None
        self.wandb = None
        if "tensorboard" in config.train.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
        if "wandb" in config.train.report_to:
            self.wandb = _wandb_run(config, workdir)

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)


def _wandb_run(config: Config, workdir: Path):
    """The W&B run of this workdir (resumed by its stored id); project from WANDB_PROJECT, else
    "limoe"; files under WANDB_DIR, else the workdir; WANDB_MODE=offline works without a network."""
    import wandb

    id_file = workdir / WANDB_RUN_ID
    stored: Optional[str] = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "limoe"), dir=os.environ.get("WANDB_DIR", str(workdir)),
                     id=stored or None, name=workdir.resolve().name, resume="allow", config=to_dict(config))
    if run.id != stored:
        atomic_write(id_file, lambda tmp: tmp.write_text(run.id + "\n"))
    return run
