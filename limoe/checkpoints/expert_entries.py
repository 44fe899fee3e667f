"""Experts in checkpoints: the one place that knows how a rank's stacked experts map to named entries.

An MoE layer holds its experts stacked, this rank's only ([E_l, ...], `limoe.model.moe`). A
training checkpoint names each global expert's tensor on its own, as DeepSpeed's
one-module-per-expert layer named it relative to the layer:
`deepspeed_moe.experts.deepspeed_experts.5.fc1.weight` is row 5 of the unsharded layer's
`fc1_weight`. So the entries written by all expert-parallel ranks together are the same for any
expert-parallel size, and a run resumes on another one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from limoe.errors import LimoeError
from limoe.model.moe import EXPERT_PARAMETERS, MoeMlp

PER_EXPERT_NAME = re.compile(  # `layer` keeps its trailing dot (empty for the layer's own entries)
    r"^(?P<layer>(.*\.)?)deepspeed_moe\.experts\.deepspeed_experts\.(?P<index>\d+)\.(?P<linear>fc1|fc2)\.(?P<kind>weight|bias)$"
)


def _per_expert_name(global_index: int, parameter: str) -> str:
    """`fc1_weight` of global expert 5 → `deepspeed_moe.experts.deepspeed_experts.5.fc1.weight`."""
    linear, kind = parameter.split("_")
    return f"deepspeed_moe.experts.deepspeed_experts.{global_index}.{linear}.{kind}"


def expert_checkpoint_entries(layer: MoeMlp, tensor_of: Callable[[nn.Parameter], Tensor]) -> dict[str, Tensor]:
    """This rank's experts as checkpoint entries that do not depend on how experts are sharded.

    `tensor_of(parameter)` gives what to store for one of the stacked expert parameters (its value
    or an optimizer moment [E_l, ...], or its optimizer step, a scalar). The entries are one per
    global expert, named relative to the layer (a step is stored under every expert's name).
    `tensor_of` is called for every expert parameter in the same order on every rank (it may be a
    collective).
    """
    entries = {}
    for parameter in EXPERT_PARAMETERS:
        value = tensor_of(getattr(layer, parameter))  # [E_l, ...] or a scalar
        for local_index in range(layer.num_local_experts):
            global_index = layer.sharding.global_index(local_index, layer.num_local_experts)
            entries[_per_expert_name(global_index, parameter)] = value[local_index] if value.dim() else value.clone()
    return entries


def restore_expert_entries(layer: MoeMlp, entries: Mapping[str, Tensor],
                           put: Callable[[nn.Parameter, Tensor], None]) -> None:
    """The reverse of `expert_checkpoint_entries`: `put(parameter, tensor)` for each stacked expert
    parameter, the tensor being this rank's experts' entries stacked [E_l, ...] (scalars, the
    optimizer step, give their largest: the parameter has stepped that often); `entries` are keyed
    as in the unsharded layer, so written by any number of ranks. A missing entry raises what
    `entries` raises for a missing key."""
    for parameter in EXPERT_PARAMETERS:
        values = [entries[_per_expert_name(layer.sharding.global_index(local_index, layer.num_local_experts), parameter)]
                  for local_index in range(layer.num_local_experts)]
        put(getattr(layer, parameter), torch.stack(values) if values[0].dim() else max(values))


def stacked_experts(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A whole state in the per-expert naming, every layer's experts stacked as the unsharded
    model holds them: `L.deepspeed_moe.experts.deepspeed_experts.{i}.fc1.weight` → row i of
    `L.fc1_weight` (likewise fc1.bias, fc2.weight, fc2.bias). Other entries pass through unchanged;
    a layer lacking one of its experts is a LimoeError."""
    converted: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = defaultdict(dict)
    for name, tensor in state.items():
        expert = PER_EXPERT_NAME.match(name)
        if expert:
            experts[expert["layer"], f"{expert['linear']}_{expert['kind']}"][int(expert["index"])] = tensor
        else:
            converted[name] = tensor
    for (layer, parameter), by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
            raise LimoeError(f"{layer}{parameter}: the checkpoint lacks expert(s) {missing}; it is incomplete.")
        converted[layer + parameter] = torch.stack([by_index[i] for i in range(len(by_index))])
    return converted
