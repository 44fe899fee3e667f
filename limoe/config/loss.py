"""`loss`: the contrastive objective and the routing losses that keep the experts balanced."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from limoe.config.keys import setting
from limoe.config.modalities import PerModality


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
    local_entropy: PerModality = setting(PerModality(image=0.01, text=0.01), "weight of LIMoE's local entropy "
                                         "loss, per modality", "[0, inf)")
    global_entropy: PerModality = setting(PerModality(image=0.01, text=0.01), "weight of LIMoE's global entropy "
                                          "loss, per modality", "[0, inf)")
    global_entropy_min_experts: PerModality = setting(
        PerModality(image=8.0, text=3.0), "S_m: the global entropy loss is off once a modality's marginal routing "
        "entropy reaches log S_m", "[1, inf)")
    router_z: float = setting(0.0, "weight of ST-MoE's router z-loss (0: off)", "[0, inf)")
    local_loss: bool = setting(True, "clip: each rank computes its own pairs' rows of the logits, B_local × B_global "
                                     "instead of B_global²; the loss averaged over ranks and the gradient are the "
                                     "same (siglip always works in local blocks)")
