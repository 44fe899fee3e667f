"""`loss`: the contrastive objective and the routing losses that keep the experts balanced."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from limoe.config.keys import setting
from limoe.config.modalities import PerModality

# Each modality's number for a per-modality key that does not name it. Image and text: LIMoE's
# (weights 0.01, S_image 8, S_text 3). Audio [D]: no published model routes audio through shared
# top-1 experts with these losses; it gets the image's weights and threshold (both are dense
# patch sequences of a few hundred tokens). Video [D]: likewise the image's (its tokens are the
# image patch grid repeated over time).
MODALITY_DEFAULTS = {
    "local_entropy": {"image": 0.01, "text": 0.01, "audio": 0.01, "video": 0.01},
    "global_entropy": {"image": 0.01, "text": 0.01, "audio": 0.01, "video": 0.01},
    "global_entropy_min_experts": {"image": 8.0, "text": 3.0, "audio": 8.0, "video": 8.0},
}


def _defaults_text(key: str) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in MODALITY_DEFAULTS[key].items())


@dataclass(frozen=True)
class LossConfig:
    """Contrastive loss and the V-MoE / LIMoE auxiliary losses (weights and thresholds)."""

    contrastive: Literal["clip", "siglip"] = setting("clip", "clip: symmetric InfoNCE over the global batch; "
                                                             "siglip: the pairwise sigmoid loss")
    logit_scale_init: float = setting(math.log(10.0), "initial log-temperature (log 10); training keeps it in "
                                                      "[0, log 100]", "[0, 4.6052]")
    logit_bias_init: float = setting(-10.0, "initial logit bias of the siglip loss (unused by clip)", "(-inf, inf)")
    importance: float = setting(0.005, "weight of V-MoE's importance loss", "[0, inf)")
    load: float = setting(0.005, "weight of V-MoE's load loss", "[0, inf)")
    local_entropy: PerModality = setting(
        PerModality(), "weight of LIMoE's local entropy loss, by modality name; each of "
        f"model.modalities not named gets its default ({_defaults_text('local_entropy')}; audio's and video's are "
        "[D]); naming "
        "a modality the model lacks is an error", "[0, inf)")
    global_entropy: PerModality = setting(
        PerModality(), "weight of LIMoE's global entropy loss, by modality name; defaults as local_entropy's "
        f"({_defaults_text('global_entropy')})", "[0, inf)")
    global_entropy_min_experts: PerModality = setting(
        PerModality(), "S_m by modality name: the global entropy loss is off once a modality's marginal routing "
        f"entropy reaches log S_m; defaults {_defaults_text('global_entropy_min_experts')} (audio's and video's "
        "[D]: as image's)", "[1, inf)")
    router_z: float = setting(0.0, "weight of ST-MoE's router z-loss (0: off)", "[0, inf)")
    local_loss: bool = setting(True, "clip: each rank computes its own pairs' rows of the logits, B_local × B_global "
                                     "instead of B_global²; the loss averaged over ranks and the gradient are the "
                                     "same (siglip always works in local blocks)")

    def for_modalities(self, modalities: Sequence[str]) -> "LossConfig":
        """This config with every per-modality key holding exactly `modalities` (a model's, in its
        order): the numbers given, else the defaults (`MODALITY_DEFAULTS`). `Config` applies it, so
        a run's loss config always matches its model; naming a modality not in `modalities` is an error."""
        return dataclasses.replace(self, **{
            key: getattr(self, key).for_modalities(modalities, defaults, f"loss.{key}")
            for key, defaults in MODALITY_DEFAULTS.items()})
