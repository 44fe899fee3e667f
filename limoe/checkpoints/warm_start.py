"""Starting a run from another run's weights (`train.init_from`), e.g. contrastive training from
`limoe pretrain`'s model: an exported model file or a workdir's latest checkpoint, loaded into a
freshly built model of the same architecture. Only weights move; optimizer, schedule and step
start fresh.

Strict on purpose: every tensor of the new model must be found with its shape, or the run stops
with one line naming the tensor. Besides the model's, a source may hold only the known
training-only tensors of an objective (pretraining decoder, heads and fusion blocks, the SigLIP
bias), which are left out and listed; any other tensor is refused, because an ignored tensor
usually means the wrong file.

Experts are matched by global index, so a model sharded over ep ranks takes its own experts from
a source that holds all of them. `source_name` is the one place that says where a tensor's
values come from: a warm start that is not one-to-one (sparse upcycling: each expert from the
dense twin's MLP) changes that mapping, not the checks around it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from limoe.checkpoints.model_file import read_model_file
from limoe.checkpoints.training import TRAINER_PREFIX, objective_state
from limoe.distributed import rank_and_world
from limoe.errors import LimoeError
from limoe.model.moe import MoeMlp
from limoe.model.tower import Limoe

log = logging.getLogger(__name__)

# Tensors of training objectives that are not part of the model, by name in the objective module:
# the SigLIP bias (ContrastiveTrainer) and MaskedPretraining's heads, dropped by every export.
TRAINING_ONLY = ("contrastive.", "image_decoder.", "mlm_head.", "mask_embedding", "image_fusion.", "text_fusion.")
_EXPERT = re.compile(r"^(?P<layer>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<index>\d+)\.(?P<tensor>.+)$")


@dataclass(frozen=True)
class WarmStart:
    """What `warm_start` did."""

    source: Path
    loaded: int  # tensors copied into the model
    dropped: tuple[str, ...]  # the source's training-only tensors, left out


def read_source(source: Path) -> dict[str, Tensor]:
    """All tensors of an exported file or a workdir's latest checkpoint: the model's under their
    `Limoe.state_dict()` names (experts by global index), an objective's under its own names."""
    if not source.exists():
        raise LimoeError(f"train.init_from {source} does not exist; give an exported .safetensors file or a workdir.")
    if not source.is_dir():
        return read_model_file(source)[0]
    state, _ = objective_state(source)
    return {name.removeprefix(TRAINER_PREFIX): tensor for name, tensor in state.items()}


def source_name(name: str, model: Limoe) -> str:
    """Where the model's tensor `name` is found in a source: the same name, except that local
    expert l of a sharded MoE layer is the source's expert with this rank's global index."""
    match = _EXPERT.match(name)
    if match is None:
        return name
    moe: MoeMlp = model.get_submodule(match["layer"])
    index = moe.sharding.global_index(int(match["index"]), moe.num_local_experts)
    return _expert_name(match, index)


def _expert_name(match: re.Match, index: int) -> str:
    return f"{match['layer']}.deepspeed_moe.experts.deepspeed_experts.{index}.{match['tensor']}"


def _names_of_all_ranks(model: Limoe) -> set[str]:
    """The source names every rank's model together reads: all experts of each MoE layer."""
    names = set()
    for name in model.state_dict():
        match = _EXPERT.match(name)
        if match is None:
            names.add(name)
        else:
            names.update(_expert_name(match, i) for i in range(model.get_submodule(match["layer"]).num_experts))
    return names


def warm_start(model: Limoe, source: Path) -> WarmStart:
    """Load the weights of `source` (exported file or workdir) into `model` in place; see the module."""
    state = read_source(Path(source))
    architecture = f"{model.config.name} (width {model.config.width}, depth {model.config.depth})"
    loaded = {}
    for name, target in model.state_dict().items():
        origin = source_name(name, model)
        if origin not in state:
            raise LimoeError(f"train.init_from {source} has no tensor {origin}, which the {architecture} model needs; "
                             f"start from a model of the same architecture.")
        if state[origin].shape != target.shape:
            raise LimoeError(f"train.init_from {source}: tensor {origin} has shape {tuple(state[origin].shape)}, the "
                             f"{architecture} model's is {tuple(target.shape)}; start from a model of the same architecture.")
        loaded[name] = state[origin]
    extra = sorted(set(state) - _names_of_all_ranks(model))
    unknown = [name for name in extra if not name.startswith(TRAINING_ONLY)]
    if unknown:
        raise LimoeError(f"train.init_from {source} holds tensor {unknown[0]}, which is neither in the {architecture} "
                         f"model nor a known training-only head; it was saved from another architecture or objective.")
    model.load_state_dict(loaded)
    result = WarmStart(Path(source), len(loaded), tuple(extra))
    if rank_and_world()[0] == 0:
        log.info("started from %s: %d tensors loaded%s", source, result.loaded,
                 f", {len(extra)} training-only tensors left out" if extra else "")
    return result
