"""Typed, frozen configuration: what every other module reads.

YAML files under `configs/` are parsed into these dataclasses, one section per module (`model`,
`moe`, `audio`, `loss`, `data`, `optim`, `training`, `distributed`, `pretrain`, `tasks`, `evaluation`),
composed by `run.Config`. Each section checks its own keys when it is built; `Config` checks what
spans sections. `codec` decodes mappings into the dataclasses strictly (an unknown key or a value of
the wrong type is an error naming its dotted path) and `loading` reads files, `base:` references and
`--set` overrides.

Every key is declared with `setting(default, meaning, valid)` (`keys`): what it means, and for
numbers the interval they must lie in (`"[1, inf)"`), checked on load so that a bad value is one
line naming the key before any data is read or model built. A new key is added the same way, then
`python -m limoe.config.docs` regenerates docs/CONFIG.md; the tests fail on a key without a meaning
or interval and on a stale docs/CONFIG.md.
"""

from limoe.config.codec import from_dict, parse_override, to_dict
from limoe.config.data import DataConfig, ShardSource
from limoe.config.distributed import DistributedConfig
from limoe.config.evaluation import EvalConfig, ZeroshotEvalConfig
from limoe.config.keys import Interval, setting
from limoe.config.loading import (
    CONFIG_DIR,
    config_from_dict,
    deep_merge,
    dump_config,
    find_config,
    load_config,
    load_model_config,
)
from limoe.config.loss import LossConfig
from limoe.config.modalities import MODALITIES, PerModality
from limoe.config.model import ModelConfig
from limoe.config.moe import MoeConfig, every_n_layers, last_n_layers
from limoe.config.optim import OptimConfig
from limoe.config.pretrain import PretrainConfig
from limoe.config.run import Config
from limoe.config.tasks import ScheduleConfig, TaskConfig
from limoe.config.training import TrainConfig

__all__ = [
    "CONFIG_DIR", "MODALITIES", "Config", "DataConfig", "DistributedConfig", "EvalConfig", "Interval", "LossConfig",
    "ModelConfig", "MoeConfig", "OptimConfig", "PerModality", "PretrainConfig", "ScheduleConfig", "ShardSource",
    "TaskConfig", "TrainConfig", "ZeroshotEvalConfig", "config_from_dict", "deep_merge", "dump_config",
    "every_n_layers", "find_config", "from_dict", "last_n_layers", "load_config", "load_model_config",
    "parse_override", "setting", "to_dict",
]
