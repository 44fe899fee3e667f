"""Names from earlier limoe versions, converted to today's when a checkpoint or model file is read.

Files on disk keep the names they were written with; each conversion here maps one earlier
naming to the next, and the readers (`model_file.read_model_file`, `store.Entries`,
`warm_start.source_shapes_as_meta`) pass every stored name through them.
"""

from __future__ import annotations

import re

# Before the modality registry (limoe.modalities) the tower held each modality's modules as
# attributes of its own; now they sit in ModuleDicts keyed by modality name, and the parameters
# the tower holds for a modality's embedder are named `<modality>_<key>` (image_positions stays).
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
