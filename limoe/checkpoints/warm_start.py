"""Starting a run from another run's weights (`train.init_from`), e.g. contrastive training from
`limoe pretrain`'s model: an exported model file or a workdir's newest complete training
checkpoint (limoe's code-free format; nothing is unpickled), loaded into a freshly built model of
the same architecture. Only weights move; optimizer, schedule and step start fresh.

Strict on purpose: every tensor of the new model must be found with its shape, and a source may
hold no tensor the model lacks, or the run stops with one line naming the tensor; an ignored
tensor usually means the wrong file. The exceptions are the contrastive loss's own parameters
(`LOSS_PARAMETERS`): SigLIP's bias exists only under that loss, so it is taken when both sides
have it, kept at its initial value when the source lacks it, and left out when the model does.
A workdir's training-only heads (pretraining's decoder and fusion blocks) are never read: only
the model's entries are.

`check_init_from` makes these checks from the source's names and shapes alone, before the
workdir is touched; `warm_start` loads the values into each rank's model. Experts are matched by
global index, so a model sharded over expert-parallel ranks takes its own experts from a source
that holds all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from limoe.checkpoints.model_file import read_model_file
from limoe.checkpoints.training import checkpoint_at, checkpoint_config, consolidated_state
from limoe.config import Config
from limoe.distributed import rank_and_world
from limoe.errors import LimoeError
from limoe.model.moe import EXPERT_PARAMETERS, MoeMlp, stacked_expert_state
from limoe.model.tower import Limoe, build_model

log = logging.getLogger(__name__)
LOSS_PARAMETERS = ("logit_bias",)  # exists only under the loss that uses it (SigLIP)


def _source(init_from: str) -> Path:
    source = Path(init_from)
    if not source.exists():
        raise LimoeError(f"train.init_from {source} does not exist; give an exported .safetensors file or a workdir.")
    return source


def source_shapes(source: Path) -> dict[str, torch.Size]:
    """Names and shapes of the model tensors `source` holds, read without loading any values."""
    if source.is_dir():
        try:
            config = checkpoint_config(checkpoint_at(source))
        except LimoeError as error:
            raise LimoeError(f"train.init_from: {error}") from None
        with torch.device("meta"):
            skeleton = build_model(config)
        return {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    try:
        with safe_open(str(source), framework="pt") as handle:
            stored = {name: torch.empty(handle.get_slice(name).get_shape(), device="meta") for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise LimoeError(f"train.init_from {source} is not a readable safetensors file ({error}).") from None
    return {name: tensor.shape for name, tensor in stacked_expert_state(stored).items()}  # files of any expert layout


def _unsharded_shapes(config: Config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in build_model(config).state_dict().items()}


def _check_fits(source: Path, shapes: dict[str, torch.Size], config: Config) -> None:
    """One line naming the first tensor of the model `config` describes that `source` lacks or
    holds in another shape, or the first tensor of `source` the model does not have."""
    architecture = f"{config.model.name} (width {config.model.width}, depth {config.model.depth})"
    wanted = _unsharded_shapes(config)
    for name, shape in wanted.items():
        if name not in shapes and name not in LOSS_PARAMETERS:
            raise LimoeError(f"train.init_from {source} has no tensor {name}, which the {architecture} model needs; "
                             f"start from a model of the same architecture.")
        if name in shapes and shapes[name] != shape:
            raise LimoeError(f"train.init_from {source}: tensor {name} has shape {tuple(shapes[name])}, the "
                             f"{architecture} model's is {tuple(shape)}; start from a model of the same architecture.")
    unknown = sorted(set(shapes) - set(wanted) - set(LOSS_PARAMETERS))
    if unknown:
        raise LimoeError(f"train.init_from {source} holds tensor {unknown[0]}, which the {architecture} model does "
                         f"not have; it was saved from another architecture.")


def check_init_from(config: Config) -> None:
    """Refuse a `train.init_from` that cannot seed this run, in one line, reading names and shapes only."""
    if config.train.init_from is not None:
        source = _source(config.train.init_from)
        _check_fits(source, source_shapes(source), config)


def _read_source(source: Path) -> dict[str, Tensor]:
    """The model tensors of an exported file or a workdir's newest checkpoint, unsharded names."""
    return consolidated_state(source)[0] if source.is_dir() else stacked_expert_state(read_model_file(source)[0])


def _local_values(model: Limoe, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` (the unsharded model's tensors) under this rank's `model.state_dict()` names, each
    MoE layer's stacked expert tensors cut to this rank's experts by the layer itself."""
    values = {name: state[name] for name in model.state_dict() if name in state}
    for prefix, layer in model.named_modules():
        if isinstance(layer, MoeMlp):
            for parameter in EXPERT_PARAMETERS:
                name = f"{prefix}.{parameter}"
                values[name] = layer.local_experts_of(state[name])
    return values


def warm_start(model: Limoe, config: Config) -> int:
    """Load the weights of `config.train.init_from` (exported file or workdir) into `model`, this
    rank's part of the model `config` describes, in place; returns the number of tensors loaded."""
    source = _source(config.train.init_from)
    state = _read_source(source)
    _check_fits(source, {name: tensor.shape for name, tensor in state.items()}, config)
    values = _local_values(model, state)
    model.load_state_dict(values, strict=False)  # only LOSS_PARAMETERS may be absent (checked above)
    if rank_and_world()[0] == 0:
        kept = [name for name in LOSS_PARAMETERS if name in model.state_dict() and name not in values]
        log.info("started from %s: %d tensors loaded%s", source, len(values),
                 f"; {', '.join(kept)} kept at its initial value" if kept else "")
    return len(values)
