"""The linear-probe baseline of few-shot learning: logistic regression on frozen image features.

As in the CLIP paper's linear probes: multinomial logistic regression with an L2 penalty on the
weights, fitted to convergence with L-BFGS (full batch; few-shot sets are small). The penalty is
swept over a grid and the best query accuracy is reported, i.e. chosen with hindsight on the
queries: an upper bound on what a probe with a held-out choice of the penalty would score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from limoe.evaluate.metrics import classification_metrics

PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # λ of mean CE + λ/2·‖W‖², i.e. sklearn's 1/(C·N)


def fit_linear_probe(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float,
                     max_iterations: int = 100) -> nn.Linear:
    """A linear classifier [D → C] of features [N, D] for labels [N], from zero weights."""
    probe = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + weight_decay / 2 * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe


def best_linear_probe(support_features: Tensor, support_labels: Tensor, query_features: Tensor, query_labels: Tensor,
                      num_classes: int) -> dict[str, float]:
    """Query top-1 of the best probe over `PROBE_WEIGHT_DECAYS`, and its weight decay."""
    results = []
    for weight_decay in PROBE_WEIGHT_DECAYS:
        probe = fit_linear_probe(support_features, support_labels, num_classes, weight_decay)
        with torch.no_grad():
            top1 = classification_metrics(probe(query_features), query_labels)["top1"]
        results.append((top1, weight_decay))
    top1, weight_decay = max(results, key=lambda result: result[0])
    return {"linear_probe_top1": top1, "linear_probe_weight_decay": weight_decay}
