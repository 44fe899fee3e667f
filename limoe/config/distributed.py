"""`distributed`: how the processes of a run share the experts, the optimizer state and DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from limoe.config.keys import setting


@dataclass(frozen=True)
class DistributedConfig:
    """How the processes share the work."""

    expert_parallel_size: int = setting(1, "ranks each MoE layer's experts are sharded over; divides the number "
                                           "of processes and of experts", "[1, inf)")
    zero_stage: int = setting(0, "DeepSpeed ZeRO stage: 1 partitions the optimizer state, 2 also the gradients "
                                 "(3 is refused: DeepSpeed's MoE layers do not support it)", "[0, 3]")
    timeout_minutes: int = setting(30, "collective operations wait this long before failing", "[1, inf)")
    deepspeed_config: Union[str, dict, None] = setting(
        None, "extra DeepSpeed settings merged into the generated config: a JSON file's path or a mapping; keys "
              "limoe sets (batch sizes, precision, clipping, ZeRO stage, optimizer) may only repeat its values")
