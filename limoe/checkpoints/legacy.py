"""Checkpoints written by an earlier limoe, read as today's: every conversion of an old format.

Every checkpoint records the format version it was written in: a training checkpoint in its
`manifest.json` (`version`), a model file in its metadata (`limoe_format_version`; a file without
one is of version 1, the oldest). `CONVERSIONS` lists, oldest first, what changed at each
version; reading something of version v applies, in order, every conversion of a version above v,
so old files load exactly as they did before each change. A change to the stored layout is one
more entry here, and `FORMAT_VERSION`, what new checkpoints record, follows the last entry.

Version 2 (the first recorded in model files): the experts are stacked per layer. Before it, a
model file holds each expert's tensors under DeepSpeed's per-expert names
(`L.deepspeed_moe.experts.deepspeed_experts.{i}.fc1.weight`), and any checkpoint may name a router
`L.deepspeed_moe.gate.wg.weight` (also under an optimizer prefix) rather than `L.router_weight`.
Training checkpoints keep naming experts one by one: that is how they stay independent of the
expert-parallel size (`expert_entries`), not an old format.

Version 3: the modality registry (`limoe.modalities`). The tower held each modality's modules as
attributes of its own (`patch_embed`, `token_embed`, `image_pool`, `text_proj`, `cls_token`); they
now sit in ModuleDicts keyed by modality name, and the parameters the tower holds for a modality's
embedder are named `<modality>_<key>` (`image_positions` keeps its name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from torch import Tensor

from limoe.checkpoints.expert_entries import stacked_experts

OLDEST_VERSION = 1  # what a model file without a recorded version is


def _unchanged(value):
    return value


@dataclass(frozen=True)
class Conversion:
    """What changed at format `version`, as two steps that turn what was written before it into
    what is written since: `name` renames one stored tensor name (of a model file, or of a
    training checkpoint's model or optimizer entries, whatever its prefix), `model_state` then
    turns a model file's whole state dict (already renamed) into today's layout."""

    version: int
    name: Callable[[str], str] = _unchanged
    model_state: Callable[[dict[str, Tensor]], dict[str, Tensor]] = _unchanged


_PER_EXPERT_ROUTER = re.compile(r"^(?P<layer>(.*\.)?)deepspeed_moe\.gate\.wg\.weight$")


def _stacked_router_name(name: str) -> str:
    """`L.deepspeed_moe.gate.wg.weight` (DeepSpeed's gate, under any prefix) → `L.router_weight`."""
    router = _PER_EXPERT_ROUTER.match(name)
    return f"{router['layer']}router_weight" if router else name


_BEFORE_MODALITY_REGISTRY = {
    "patch_embed.": "embedders.image.patch_embed.",
    "cls_token": "image_cls_token",
    "token_embed.": "embedders.text.token_embed.",
    "image_pool.": "pools.image.",
    "text_pool.": "pools.text.",
    "image_proj.": "projections.image.",
    "text_proj.": "projections.text.",
}
# An old name at the start of a model's state dict, of a training checkpoint's `model.` entries,
# or after an optimizer key (`exp_avg/model.`): a module's prefix, or a parameter's whole name.
_OLD_TOWER_NAME = re.compile(r"^(?P<prefix>([^/]+/)?(model\.)?)(?P<old>%s)" % "|".join(
    re.escape(old) if old.endswith(".") else f"{re.escape(old)}$" for old in _BEFORE_MODALITY_REGISTRY))


def modality_registry_name(name: str) -> str:
    """A stored tensor name from before the modality registry in today's naming:
    `patch_embed.weight` → `embedders.image.patch_embed.weight`, `cls_token` → `image_cls_token`,
    `image_pool.map.probe` → `pools.image.map.probe`, `text_proj.weight` → `projections.text.weight`,
    also under a training checkpoint's `model.` and optimizer prefixes (`exp_avg/model.cls_token`).
    Any other name is returned unchanged."""
    match = _OLD_TOWER_NAME.match(name)
    if match is None:
        return name
    return match["prefix"] + _BEFORE_MODALITY_REGISTRY[match["old"]] + name[match.end():]


CONVERSIONS = (
    Conversion(2, name=_stacked_router_name, model_state=stacked_experts),
    Conversion(3, name=modality_registry_name),
)
FORMAT_VERSION = CONVERSIONS[-1].version  # what this limoe writes, and the newest it reads


def _since(version: int) -> tuple[Conversion, ...]:
    return tuple(conversion for conversion in CONVERSIONS if conversion.version > version)


def current_name(name: str, version: int) -> str:
    """A tensor name stored in format `version`, in today's naming."""
    for conversion in _since(version):
        name = conversion.name(name)
    return name


def current_model_state(state: Mapping[str, Tensor], version: int) -> dict[str, Tensor]:
    """A model file's state dict stored in format `version`, in today's names and layout."""
    state = dict(state)
    for conversion in _since(version):
        state = conversion.model_state({conversion.name(name): tensor for name, tensor in state.items()})
    return state
