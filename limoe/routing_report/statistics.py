"""Routing statistics over many batches: where each modality's tokens go, what is dropped, how spread.

Every MoE call records additive counts (`LayerRouting`: tokens routed and kept per modality and
expert, summed gate probabilities and entropies). `RoutingAccumulator` sums them over batches
without a host sync; `statistics()` turns the sums into plain JSON numbers once, when they are
logged or written to `routing.json`. The same numbers feed the training log, the collapse
warnings and the `limoe routing` report, so all three always agree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from limoe.modalities import DEFAULT_MODALITIES, MODALITIES, modality
from limoe.model.routing import LayerRouting, entropy

USED_SHARE = 0.01  # an expert is "used" by a modality when it gets at least 1% of that modality's tokens
COLLAPSE_SHARE = 0.9  # one expert taking this share of a modality's tokens in a layer is a collapse


@dataclass
class _Sums:
    """All MoE layers' counts summed over batches, in float64 so that long windows count exactly."""

    routed: Tensor  # [layers, M, E] tokens whose top-1 expert is e
    kept: Tensor  # [layers, M, E] of those, the ones that got a slot
    prob_sum: Tensor  # [layers, M, E] Σ p(x)
    entropy_sum: Tensor  # [layers, M] Σ H(p(x))
    slots: Tensor  # [layers] per expert: Σ capacity × groups; on the CPU (known there, no copy per step)

    @classmethod
    def of(cls, routing: list[LayerRouting]) -> "_Sums":
        def stack(name: str) -> Tensor:
            return torch.stack([getattr(record, name).detach() for record in routing]).double()

        slots = torch.tensor([record.capacity * record.num_groups for record in routing], dtype=torch.float64)
        return cls(stack("routed"), stack("kept"), stack("prob_sum"), stack("entropy_sum"), slots)

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def __add__(self, other: "_Sums") -> "_Sums":
        return _Sums(*(a + b for a, b in zip(self.tensors(), other.tensors())))


class RoutingAccumulator:
    """Sums each MoE layer's routing counts over the batches given to `add`.

    `add` only adds tensors on their device (cheap, no synchronisation), so the trainer can call
    it every step and read `statistics()` every N steps; `reset()` starts a new window.
    """

    def __init__(self, moe_layers: Sequence[int], modalities: Sequence[str] = DEFAULT_MODALITIES):
        self.moe_layers = tuple(moe_layers)  # block index of each MoE layer, in depth order
        self.modalities = tuple(modalities)  # the model's (`model.modalities`): row m of the counts is the m-th
        self.reset()

    def reset(self) -> None:
        self.num_batches = 0
        self._sums: Optional[_Sums] = None

    def add(self, routing: list[LayerRouting]) -> None:
        """One batch's routing records, one per MoE layer in depth order (`LimoeOutput.routing`)."""
        if len(routing) != len(self.moe_layers):
            raise ValueError(f"expected {len(self.moe_layers)} routing records (blocks {self.moe_layers}), "
                             f"got {len(routing)}")
        self.num_batches += 1
        if not routing:  # a dense model: batches, but nothing routed
            return
        batch = _Sums.of(routing)
        self._sums = batch if self._sums is None else self._sums + batch

    def all_reduce(self, group=None) -> None:
        """Sum the counts (and batches) of all ranks in `group`, in place, with one collective.

        Call it on every rank after the same number of `add`s; each rank's `statistics()` is then
        the global one. Without MoE layers (or before any `add`) there is nothing to reduce.
        """
        if self._sums is None:
            return
        tensors = self._sums.tensors()
        device = tensors[0].device
        batches = torch.tensor([self.num_batches], dtype=torch.float64, device=device)
        flat = torch.cat([t.to(device).flatten() for t in tensors] + [batches])
        dist.all_reduce(flat, group=group)
        parts = flat.split([t.numel() for t in tensors] + [1])
        self._sums = _Sums(*(part.view_as(t).to(t.device) for part, t in zip(parts, tensors)))
        self.num_batches = round(float(parts[-1]))

    def statistics(self) -> dict:
        """The accumulated statistics as a JSON-serialisable dict (schema in docs/ROUTING.md)."""
        if self._sums is None:
            return {"num_batches": self.num_batches, "num_experts": None, "layers": []}
        routed, kept, prob_sum, entropy_sum, slots = (t.cpu() for t in self._sums.tensors())  # the one host copy
        num_experts = routed.shape[-1]
        return {
            "num_batches": self.num_batches,
            "num_experts": num_experts,
            "max_entropy": math.log(num_experts),
            "used_share": USED_SHARE,
            "layers": [
                _layer_statistics(block, self.modalities, routed[i], kept[i], prob_sum[i], entropy_sum[i],
                                  int(slots[i]))
                for i, block in enumerate(self.moe_layers)
            ],
        }


def layer_modalities(layer: dict) -> list[str]:
    """The modalities one layer of `statistics()` holds (the model's), in registry order."""
    return [name for name in MODALITIES if name in layer]


def _ratio(numerator: Tensor, denominator: Tensor) -> list[Optional[float]]:
    """Elementwise numerator / denominator as floats, None where the denominator is 0."""
    return [float(n / d) if d > 0 else None for n, d in zip(numerator.tolist(), denominator.tolist())]


def _modality_statistics(routed: Tensor, kept: Tensor, prob_sum: Tensor, entropy_sum: Tensor) -> dict:
    """One modality in one layer. routed, kept, prob_sum [E]; entropy_sum []."""
    tokens = routed.sum()
    stats = {"tokens": round(float(tokens)), "routed": [round(v) for v in routed.tolist()],
             "kept": [round(v) for v in kept.tolist()]}
    if tokens == 0:
        empty = ("share", "routing_success", "dropped", "token_entropy", "marginal_entropy", "experts_used",
                 "top_expert", "top_share")
        return {**stats, **dict.fromkeys(empty)}
    share = routed / tokens  # [E]
    success = float(kept.sum() / tokens)
    return {
        **stats,
        "share": share.tolist(),
        "routing_success": success,
        "dropped": 1.0 - success,
        "token_entropy": float(entropy_sum / tokens),
        "marginal_entropy": float(entropy(prob_sum / tokens)),
        "experts_used": int((share >= USED_SHARE).sum()),
        "top_expert": int(share.argmax()),
        "top_share": float(share.max()),
    }


def _layer_statistics(block: int, modalities: Sequence[str], routed: Tensor, kept: Tensor, prob_sum: Tensor,
                      entropy_sum: Tensor, slots: int) -> dict:
    """One MoE layer: per modality of the model, and per expert the image share (a model with
    images) and capacity utilisation. routed, kept, prob_sum [M, E]; entropy_sum [M]; slots per expert."""
    layer = {"block": block, "slots_per_expert": slots}
    for m, name in enumerate(modalities):
        layer[name] = _modality_statistics(routed[m], kept[m], prob_sum[m], entropy_sum[m])
    if "image" in modalities:
        layer["image_share"] = _ratio(routed[modalities.index("image")], routed.sum(dim=0))
    layer["utilisation"] = (kept.sum(dim=0) / slots).tolist()  # capacity ≥ 4, so slots > 0
    return layer


@dataclass(frozen=True)
class Collapse:
    """A routing collapse of one modality in one MoE layer; (block, modality) identifies it."""

    block: int
    modality: str
    message: str


def collapses(statistics: dict) -> list[Collapse]:
    """The collapsed (layer, modality) pairs of a `statistics()` dict.

    A modality collapses in a layer when one expert takes ≥ COLLAPSE_SHARE of its tokens, or, for
    text, when a single expert is used (every other expert gets under USED_SHARE): the LIMoE
    entropy losses exist to prevent exactly this. With one expert there is nothing to collapse.
    """
    if (statistics["num_experts"] or 0) < 2:
        return []
    found = []
    for layer in statistics["layers"]:
        for modality in layer_modalities(layer):
            stats = layer[modality]
            if not stats["tokens"]:
                continue
            where = f"routing collapse in MoE block {layer['block']}"
            expert, share = stats["top_expert"], stats["top_share"]
            if share >= COLLAPSE_SHARE:
                message = f"{where}: expert {expert} takes {share:.0%} of the {modality} tokens"
            elif modality == "text" and stats["experts_used"] == 1:
                message = f"{where}: text uses a single expert ({expert}; each other one gets under {USED_SHARE:.0%})"
            else:
                continue
            found.append(Collapse(layer["block"], modality, message))
    return found


def collapse_warnings(statistics: dict) -> list[str]:
    """One message per collapsed (layer, modality), naming the layer; see `collapses`."""
    return [collapse.message for collapse in collapses(statistics)]


def _pair(stats: dict, key: str, form: str) -> str:
    """`image/text` values of one key (one per modality of the layer), '-' for a modality without tokens."""
    return "/".join("-" if stats[m][key] is None else format(stats[m][key], form) for m in layer_modalities(stats))


TABLE_COLUMNS = (  # header, width, cell(layer)
    ("block", 5, lambda layer: str(layer["block"])),
    ("tokens {labels}", 16, lambda layer: _pair(layer, "tokens", "d")),
    ("dropped", 13, lambda layer: _pair(layer, "dropped", ".1%")),
    ("gate H", 11, lambda layer: _pair(layer, "token_entropy", ".2f")),
    ("marginal H", 11, lambda layer: _pair(layer, "marginal_entropy", ".2f")),
    ("experts used", 12, lambda layer: _pair(layer, "experts_used", "d")),
    ("top share", 11, lambda layer: _pair(layer, "top_share", ".0%")),
    ("max util", 8, lambda layer: format(max(layer["utilisation"]), ".0%")),
)


def format_summary_table(statistics: dict) -> str:
    """A fixed-width per-layer table (image/text pairs, one value per modality of the model) for logs
    and the terminal."""
    if not statistics["layers"]:
        return f"{statistics['num_batches']} batches, no routing (no MoE layers, or no batches yet)"
    labels = "/".join(modality(name).short_name for name in layer_modalities(statistics["layers"][0]))
    rows = [[header.format(labels=labels) for header, _, _ in TABLE_COLUMNS]]
    rows += [[cell(layer) for _, _, cell in TABLE_COLUMNS] for layer in statistics["layers"]]
    lines = ["  ".join(text.rjust(width) for text, (_, width, _) in zip(row, TABLE_COLUMNS)) for row in rows]
    experts = statistics["num_experts"]
    note = (f"{statistics['num_batches']} batches, {experts} experts, entropies in nats "
            f"(max log {experts} = {statistics['max_entropy']:.2f})")
    return "\n".join([note, *lines])
