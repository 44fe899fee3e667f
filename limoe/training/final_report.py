"""The end-of-training report: held-out retrieval and a routing summary per MoE layer.

It reads the exported model file, so what it reports is exactly what `limoe eval` and
`limoe routing` will see, whatever expert parallelism the run used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from limoe.checkpoints import load_model
from limoe.files import atomic_write
from limoe.distributed import resolve_device
from limoe.config import Config
from limoe.evaluate import evaluate_retrieval
from limoe.routing_report.command import inspect_checkpoint
from limoe.routing_report.statistics import format_summary_table

ROUTING_BATCHES = 4


def final_report(model_file: Path, config: Config, workdir: Path) -> dict:
    """Print held-out image↔text recall (with chance level) and the routing table; save both."""
    device = resolve_device("auto")
    model, _ = load_model(model_file, device)
    retrieval = evaluate_retrieval(model, config.data.heldout, batch_size=128, workers=config.data.workers)
    chance = 5 / retrieval["images"]
    print(
        f"\nheld-out retrieval on {config.data.heldout} ({retrieval['images']} pairs, chance R@5 {chance:.1%}):\n"
        f"  image→text  R@1 {retrieval['image_to_text_R@1']:.1%}  R@5 {retrieval['image_to_text_R@5']:.1%}\n"
        f"  text→image  R@1 {retrieval['text_to_image_R@1']:.1%}  R@5 {retrieval['text_to_image_R@5']:.1%}"
    )
    routing = None
    if config.model.moe_layers:  # the dense twin has no routing
        routing = inspect_checkpoint(model, config, "final", model_file, config.data.heldout, ROUTING_BATCHES,
                                     batch_size=128, block=config.model.moe_layers[-1], device=torch.device(device)).statistics
    if routing:
        print(f"\nrouting on held-out pairs (per modality of the model, per MoE block):\n{format_summary_table(routing)}")
    metrics = {"retrieval": retrieval, "chance_R@5": chance, "routing": routing}
    atomic_write(workdir / "final_metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=1)))
    return metrics
