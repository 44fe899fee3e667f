"""Training checkpoints: DeepSpeed's format (model and optimizer states, one file per expert),
in `workdir/checkpoints/<tag>/`, with our own atomic `latest` pointer written only after every
rank has finished writing, so a run killed mid-save resumes from the previous complete one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from limoe.checkpoints.model_file import model_with, save_model_file
from limoe.config import Config, load_config
from limoe.errors import LimoeError
from limoe.files import atomic_write


CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"
TRAINER_PREFIX = "model."  # the objective's `model` (ContrastiveTrainer, MaskedPretraining)


def latest_checkpoint(workdir: Path) -> Optional[Path]:
    """The newest complete checkpoint directory of a training workdir, or None."""
    pointer = Path(workdir) / CHECKPOINT_DIR / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / MODEL_STATES).is_file() else None


def save_training_checkpoint(engine, workdir: Path, step: int, client_state: dict, keep: int) -> None:
    """Every rank writes its shard; then rank 0 moves `latest` and prunes old checkpoints."""
    root = Path(workdir) / CHECKPOINT_DIR
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write(root / LATEST, lambda tmp: tmp.write_text(tag))
        _prune(root, keep)
    dist.barrier()


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and any half-written one that is not latest)."""
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in tags[: max(len(tags) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(engine, workdir: Path) -> Optional[dict]:
    """Restore model, optimizer and scheduler into `engine`; returns the client state, or None."""
    path = latest_checkpoint(workdir)
    if path is None:
        return None
    try:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    except RuntimeError as error:  # load_state_dict: the checkpoint holds another module's tensors
        raise LimoeError(f"checkpoint {path} does not fit this run (it was written by another objective, e.g. "
                         f"`limoe pretrain` against `limoe train`): {str(error).splitlines()[0]} Use a new --workdir, "
                         f"and train.init_from to start from its weights.") from None
    if client_state is None:
        raise LimoeError(f"checkpoint {path} could not be loaded; delete it or start a new --workdir.")
    return client_state


def objective_state(workdir: Path) -> tuple[dict[str, torch.Tensor], Config]:
    """Every tensor the engine's module held at the latest checkpoint (the model under `model.`,
    plus the objective's own: loss parameters, pretraining heads), every expert gathered; and the config.

    DeepSpeed writes the shared weights once and each expert to its own file under its global
    index, so consolidation is a union of those files — no process group needed.
    """
    path = latest_checkpoint(workdir)
    if path is None:
        raise LimoeError(f"{workdir} holds no complete training checkpoint; train first or give an exported file.")
    state = dict(_torch_load(path / MODEL_STATES)["module"])
    for expert_file in sorted(path.glob("layer_*_expert_*_model_states.pt")):
        state.update(_torch_load(expert_file))
    return state, load_config(str(Path(workdir) / "config.yaml"))


def consolidated_state(workdir: Path) -> tuple[dict[str, torch.Tensor], Config]:
    """The model's weights of a workdir's latest checkpoint (every expert gathered), and its config."""
    state, config = objective_state(workdir)
    prefix = TRAINER_PREFIX  # the engine wraps the model together with its loss
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}, config


def _torch_load(path: Path) -> dict:
    """DeepSpeed's files hold Python objects besides tensors; they are our own, so trusted."""
    return torch.load(path, map_location="cpu", weights_only=False)


def export_workdir(workdir: Path, output: Path) -> None:
    """`limoe export`: the latest checkpoint as one .safetensors file with the config inside."""
    state, config = consolidated_state(workdir)
    model = model_with(state, config)
    save_model_file(model, config, output)
    print(f"exported {workdir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) to {output}")
