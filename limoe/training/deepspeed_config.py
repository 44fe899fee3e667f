"""The DeepSpeed config a run uses: generated from the limoe config, plus the user's own settings.

limoe owns the keys that decide what is computed — batch sizes, precision, gradient clipping,
the ZeRO stage, the optimizer and schedule (a torch optimizer is passed in) — and sets quieter
defaults for the rest: DeepSpeed's throughput timer, wall-clock breakdown, flops profiler and
comms logger are off (the throughput timer alone synchronises the device twice per step).
`distributed.deepspeed_config` (a JSON file or an inline mapping) is merged on top: it may change
anything limoe does not own, and a key limoe owns may only repeat limoe's value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from limoe.config import Config, deep_merge
from limoe.errors import LimoeError
from limoe.files import read_text_file

# Flattened key paths limoe sets from its own config; a user value must agree with limoe's.
OWNED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "zero_optimization.stage", "bf16", "fp16", "amp", "torch_autocast",
    "optimizer", "scheduler",
)
# Where each owned key comes from in the limoe config, for the error message.
_OWNER = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.micro_batch_size",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "distributed.zero_stage",
    "bf16": "train.precision", "fp16": "train.precision", "amp": "train.precision", "torch_autocast": "train.precision",
    "optimizer": "optim", "scheduler": "optim",
}
REDUCE_BUCKET_ELEMENTS = 50_000_000  # ZeRO's reduce and all-gather buckets: 200 MB of fp32 each [D]


def zero_clips_by_itself(config: Config) -> bool:
    """Whether DeepSpeed's ZeRO optimizer clips (stages 1 and 2), rather than limoe before the step.

    ZeRO holds only a partition of the reduced gradients, so it computes the norm: the squared
    norms of every rank's partitions summed over all ranks, which counts each expert's gradient
    once; tests/training/test_expert_parallel.py checks it against one process.
    """
    return config.distributed.zero_stage > 0


def check_zero_stage(config: Config) -> None:
    stage = config.distributed.zero_stage
    if stage == 3:
        raise LimoeError("distributed.zero_stage 3 partitions parameters, which DeepSpeed's MoE layers do not "
                         "support; use zero_stage 1 or 2 (optimizer state and gradients partitioned).")
    if stage not in (0, 1, 2):
        raise LimoeError(f"distributed.zero_stage must be 0, 1 or 2, got {stage}.")


def generated_config(config: Config, world_size: int, bf16: bool) -> dict:
    """What limoe tells DeepSpeed. DeepSpeed sees the whole per-GPU batch as one step: limoe's
    micro-batches (feature caching, `limoe.training.step`) mark its accumulation boundary themselves,
    and their surrogate losses are already scaled, so DeepSpeed must not divide them again."""
    local_batch = config.train.batch_size // world_size
    clips = zero_clips_by_itself(config)
    zero: dict[str, Any] = {"stage": config.distributed.zero_stage}
    if config.distributed.zero_stage:
        zero.update(reduce_bucket_size=REDUCE_BUCKET_ELEMENTS, allgather_bucket_size=REDUCE_BUCKET_ELEMENTS,
                    overlap_comm=True, contiguous_gradients=True)
    return {
        "train_batch_size": config.train.batch_size,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        # Without ZeRO limoe clips by the true global norm before the step (DeepSpeed's own clipping
        # averages per-rank norms under expert parallelism); ZeRO clips its partitions itself.
        "gradient_clipping": config.optim.grad_clip if clips else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "flops_profiler": {"enabled": False},
        "comms_logger": {"enabled": False},
    }


def user_config(config: Config) -> dict:
    """`distributed.deepspeed_config` as a mapping: read from its JSON file, or given inline."""
    source = config.distributed.deepspeed_config
    if source is None:
        return {}
    if isinstance(source, dict):
        return source
    path = Path(source)
    try:
        data = json.loads(read_text_file(path, "distributed.deepspeed_config file"))
    except json.JSONDecodeError as error:
        raise LimoeError(f"distributed.deepspeed_config file {path} is not valid JSON: {error}.") from None
    if not isinstance(data, dict):
        raise LimoeError(f"distributed.deepspeed_config file {path} must hold a JSON object.")
    return data


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; owned keys that hold mappings (bf16, optimizer, …) stay whole."""
    flat = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in OWNED_KEYS:
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _without_owned(mapping: dict, prefix: str = "") -> dict:
    kept = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if path in OWNED_KEYS:
            continue
        kept[key] = _without_owned(value, f"{path}.") if isinstance(value, dict) else value
    return kept


def _check_owned_key(key: str, ours: Optional[Any], theirs: Any) -> None:
    """A user value of an owned key must be limoe's own value; otherwise one line naming both."""
    if ours == theirs:
        return
    owner = _OWNER[key]
    if ours is None:
        raise LimoeError(f"distributed.deepspeed_config sets '{key}', which limoe configures from '{owner}'; "
                         f"remove it there and use '{owner}'.")
    raise LimoeError(f"distributed.deepspeed_config sets '{key}' to {json.dumps(theirs)}, but '{owner}' makes it "
                     f"{json.dumps(ours)}; remove it there or change '{owner}'.")


def deepspeed_config(config: Config, world_size: int, bf16: bool) -> dict:
    """The generated config with `distributed.deepspeed_config` merged on top; a conflicting owned key is an error."""
    check_zero_stage(config)
    ours = generated_config(config, world_size, bf16)
    theirs = user_config(config)
    limoe_values = {**_flatten(ours), "gradient_clipping": config.optim.grad_clip}  # what the user may repeat
    for key, value in _flatten(theirs).items():
        if key in OWNED_KEYS:
            _check_owned_key(key, limoe_values.get(key), value)
    return deep_merge(ours, _without_owned(theirs))
