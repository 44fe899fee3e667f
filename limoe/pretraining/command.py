"""`limoe pretrain`: masked pretraining inside `limoe train`'s engine, loop and checkpoints.

The run is `limoe.train_command.train` with the masked-pretraining objective in place of the
contrastive one, so DeepSpeed, expert parallelism, clipping, checkpoints, resume and logging are
the same code. At the end the model is exported without the training-only heads (a contrastive
model's tensors, ready for `limoe eval` and for `train.init_from`), and the report measures the
masked tasks on the held-out pairs with the heads from the workdir's last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from limoe.checkpoints.training import checkpoint_at, checkpoint_config, load_module_weights
from limoe.config import Config
from limoe.distributed import resolve_device
from limoe.files import atomic_write
from limoe.model.tower import build_model
from limoe.pretraining.evaluation import evaluate_masked_modelling
from limoe.pretraining.objective import MaskedPretraining
from limoe.train_command import train


def pretrain(config: Config, workdir: Path) -> dict:
    """Pretrain (or resume) in `workdir`; returns the held-out masked-modelling metrics (rank 0)."""
    return train(config, workdir, objective=MaskedPretraining, report=pretraining_report)


def load_objective(workdir: Path, device: str = "cpu") -> MaskedPretraining:
    """The model and its pretraining heads as of the workdir's latest checkpoint (every expert)."""
    checkpoint = checkpoint_at(workdir)
    config = checkpoint_config(checkpoint)
    objective = MaskedPretraining(build_model(config), config)
    load_module_weights(objective, checkpoint)
    return objective.to(device)


def pretraining_report(model_file: Path, config: Config, workdir: Path) -> dict:
    """Print and save the held-out masked-modelling metrics beside their baselines."""
    objective = load_objective(workdir, resolve_device("auto"))
    metrics = evaluate_masked_modelling(objective, config.data.heldout, batch_size=128, workers=config.data.workers)
    lines = [f"\nheld-out masked modelling on {config.data.heldout} (exported model, without the heads: {model_file}):"]
    for task, values in metrics.items():
        if "mse" in values:
            lines.append(f"  {task:26s} normalised-patch MSE {values['mse']:.3f}  (predicting zero {values['zero_mse']:.3f})")
        else:
            lines.append(f"  {task:26s} accuracy {values['accuracy']:.1%}  "
                         f"(most frequent token {values['most_frequent_accuracy']:.1%})")
    print("\n".join(lines))
    atomic_write(workdir / "final_metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=1)))
    return metrics
