"""Training checkpoints: saving a run in progress, resuming it on any process layout, and reading
its weights back as one unsharded model.

Every process takes part in a save: the shared parameters are written once (process 0), each
expert by the process that owns it under its global index, together with Adam's moments and step
per parameter (`engine_state`); the directory appears only when all of it is on disk (`store`).
Since entries are keyed by the unsharded model's names, a run resumes with another number of
processes, another expert-parallel size or another ZeRO stage: each process reads the shared
entries and the experts it now owns. What cannot carry over is said in the resume log line.
A failed write (disk full, read-only) is one line on every process, with `latest` and the
previous checkpoints untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from limoe.checkpoints.engine_state import (
    Prefixed,
    engine_entries,
    persistent_buffers,
    put_entries,
    restore_engine_entries,
    restore_rng_states,
    rng_states,
)
from limoe.checkpoints.hub import is_hub_reference, is_model_folder, save_model_folder
from limoe.checkpoints.model_file import config_from_data, model_with, save_model_file
from limoe.checkpoints.store import (
    CHECKPOINT_DIR,
    STATE,
    CheckpointWriter,
    StoredCheckpoint,
    is_checkpoint_directory,
    newest_complete,
    open_checkpoint,
    step_dir_name,
)
from limoe.config import Config, to_dict
from limoe.distributed import any_process, from_first_process, rank_and_world
from limoe.errors import LimoeError
from limoe.files import check_output_directory, check_output_file, describe_os_error, refuse_overwriting_inputs
from limoe.model.tower import build_model

log = logging.getLogger(__name__)
TRAINER_PREFIX = "model."  # the objective's `model`: the engine wraps the model together with its loss or heads
OBJECTIVE = "objective"  # state.json: which objective wrote the checkpoint
CONTRASTIVE, PRETRAINING, COTRAINING = "contrastive", "pretraining", "co-training"


# ---------------------------------------------------------------------------------------------
# Saving


def _run_shape(config: Config, processes: int) -> dict:
    return {"processes": processes, "expert_parallel_size": config.distributed.expert_parallel_size,
            "zero_stage": config.distributed.zero_stage}


def save_training_checkpoint(engine, workdir: Path, step: int, config: Config, progress: Optional[dict] = None,
                             objective: str = CONTRASTIVE) -> None:
    """Write step `step` of the run in `engine` to `workdir/checkpoints/` (every process calls);
    `progress` holds the run's own counters (plain numbers), given back on resume; `objective`
    names what the engine's module optimises (its entries differ: pretraining has its heads).

    Process 0 writes the shared parameters, the processes of the first expert-data-parallel
    replica (ranks below the expert-parallel size, DeepSpeed's groups being consecutive) their
    experts, and every process its RNG states. Then process 0 publishes the directory, moves
    `latest` and keeps the newest `train.keep_checkpoints`.
    """
    rank, processes = rank_and_world()
    writer = CheckpointWriter(workdir, step, rank)
    model, optimizer = engine_entries(engine, keep_shared=rank == 0,
                                      keep_experts=rank < config.distributed.expert_parallel_size)
    state = {"step": step, "progress": progress or {}, OBJECTIVE: objective, **_run_shape(config, processes),
             "lr_schedule": engine.lr_scheduler.state_dict(), "config": to_dict(config)}

    def write() -> None:
        if rank == 0:
            writer.write_json(STATE, state)
        writer.write_tensors("model", model)
        writer.write_tensors("optimizer", optimizer)
        writer.write_tensors("rng", rng_states())
        writer.finish()

    _on_every_process(writer, writer.start if rank == 0 else None)
    _on_every_process(writer, write)
    _on_every_process(writer, (lambda: writer.publish(processes, config.train.keep_checkpoints)) if rank == 0 else None)


def _on_every_process(writer: CheckpointWriter, action: Optional[Callable[[], object]]) -> None:
    """Run `action` (if any) here, then agree: if it failed on any process, every process raises
    one line (the failing one with its reason) and process 0 removes the partial directory."""
    failure: Optional[OSError] = None
    if action is not None:
        try:
            action()
        except OSError as error:
            failure = error
    if not any_process(failure is not None):
        return
    if writer.rank == 0:
        writer.discard()
    reason = describe_os_error(failure) if failure is not None else "another process could not write its part"
    raise LimoeError(
        f"could not write checkpoint {step_dir_name(writer.step)} in {writer.root} ({reason}); the previous "
        f"checkpoints and 'latest' are untouched. Free space or make the workdir writable, then re-run to resume."
    )


# ---------------------------------------------------------------------------------------------
# Resuming


def find_resume_checkpoint(workdir: Path) -> Optional[StoredCheckpoint]:
    """The newest complete checkpoint of `workdir`, or None for a fresh run (every process calls).

    Process 0 verifies the checksums (logging any checkpoint it passes over) and tells the others
    which step to read, so the files are hashed once.
    """
    rank, _ = rank_and_world()
    found, problem, chosen = None, None, -1
    if rank == 0:
        try:
            found = newest_complete(workdir)
            chosen = found.step if found is not None else -1
        except LimoeError as error:
            problem, chosen = error, -2
    chosen = from_first_process(chosen)
    if chosen == -2:
        raise problem or LimoeError(f"process 0 found no usable checkpoint in {workdir}; see its message.")
    if chosen == -1:
        return None
    return found or open_checkpoint(Path(workdir) / CHECKPOINT_DIR / step_dir_name(chosen), hash_files=False)


def check_same_objective(checkpoint: StoredCheckpoint, objective: str) -> None:
    """A workdir resumes under the objective that wrote it (`limoe train` or `limoe pretrain`)."""
    saved = checkpoint.state.get(OBJECTIVE, CONTRASTIVE)  # checkpoints from before objectives were named
    if saved != objective:
        commands = {CONTRASTIVE: "limoe train", PRETRAINING: "limoe pretrain",
                    COTRAINING: "limoe train with tasks:"}
        workdir = checkpoint.path.parent.parent
        raise LimoeError(f"{checkpoint.path} was written by {commands.get(saved, saved)}, not "
                         f"{commands.get(objective, objective)}; use a new --workdir (with "
                         f"train.init_from={workdir} to start from its weights).")


def checkpoint_config(checkpoint: StoredCheckpoint) -> Config:
    """The resolved config a checkpoint was trained with; a bad one is a LimoeError naming it."""
    return config_from_data(checkpoint.state["config"], str(checkpoint.path / STATE))


def restore_training_checkpoint(engine, checkpoint: StoredCheckpoint, config: Config) -> dict:
    """Load `checkpoint` into `engine` on this process's layout (every process calls); returns its
    step and the progress counters saved with it, {"step": …, **progress}.

    Restored: weights, Adam moments and steps (resharded when the expert-parallel size changed),
    the LR schedule, and, when the number of processes is the same, each process's RNG states.
    """
    rank, processes = rank_and_world()
    with checkpoint.entries("model") as model, checkpoint.entries("optimizer") as optimizer:
        restore_engine_entries(engine, model, optimizer)
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(checkpoint.state["lr_schedule"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    saved, now = ({key: shape[key] for key in ("processes", "expert_parallel_size", "zero_stage")}
                  for shape in (checkpoint.state, _run_shape(config, processes)))
    if saved["processes"] == processes:
        restore_rng_states(checkpoint.process_tensors("rng", rank))
    if rank == 0:
        log.warning(_resume_line(checkpoint, saved, now))
    return {**checkpoint.state["progress"], "step": checkpoint.step}


def _resume_line(checkpoint: StoredCheckpoint, saved: dict, now: dict) -> str:
    """What a resume restores and what it cannot, in one line."""
    def shape(s: dict) -> str:
        return (f"{s['processes']} process{'es' if s['processes'] != 1 else ''}, expert parallel size "
                f"{s['expert_parallel_size']}, ZeRO {s['zero_stage']}")

    line = (f"resuming from {checkpoint.path} at step {checkpoint.step}: weights, Adam moments and steps and the "
            f"LR schedule restored")
    if saved != now:
        line += f" (saved with {shape(saved)}; now {shape(now)}, experts resharded)"
    if saved["processes"] != now["processes"]:
        line += "; per-process RNG states cannot carry over to another process count and start from the seed"
    return line + "; the data stream restarts from a seed derived from train.seed and the step"


# ---------------------------------------------------------------------------------------------
# The model of a workdir, unsharded


def checkpoint_at(path: Path) -> StoredCheckpoint:
    """A workdir's newest complete checkpoint, or the checkpoint directory `path` itself."""
    path = Path(path)
    if is_checkpoint_directory(path):
        return open_checkpoint(path)
    found = newest_complete(path) if path.is_dir() else None
    if found is None:
        raise LimoeError(f"{path} holds no complete training checkpoint; train first, or give an exported .safetensors file.")
    return found


def checkpoint_sources(reference: Optional[Union[str, Path]]) -> list[Path]:
    """What loading the checkpoint `reference` reads, so that no output replaces it: an exported
    file, every file of a model folder, a workdir's `checkpoints/` or one checkpoint directory
    (nothing local for an `hf-hub:` reference, whose files are huggingface_hub's cache)."""
    if reference is None or is_hub_reference(reference):
        return []
    path = Path(reference)
    if is_model_folder(path):
        return sorted(entry for entry in path.iterdir() if entry.is_file())
    if path.is_dir() and not is_checkpoint_directory(path):
        return [path / CHECKPOINT_DIR]
    return [path]


def consolidated_state(path: Path) -> tuple[dict[str, torch.Tensor], Config]:
    """All weights of a workdir's newest complete checkpoint (or of one checkpoint directory),
    every expert in place as in the unsharded model, and its config. No process group needed."""
    return checkpoint_state(checkpoint_at(path))


def checkpoint_state(checkpoint: StoredCheckpoint) -> tuple[dict[str, torch.Tensor], Config]:
    """All weights of `checkpoint`, every expert in place as in the unsharded model, and its config."""
    config = checkpoint_config(checkpoint)
    with torch.device("meta"):  # names and shapes only: where each entry goes
        skeleton = build_model(config)
    names = {parameter: name for name, parameter in skeleton.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    with checkpoint.entries("model") as entries:
        model_entries = Prefixed(entries, TRAINER_PREFIX)
        state.update({name: model_entries[name] for name in persistent_buffers(skeleton)})
        put_entries(skeleton, model_entries, lambda parameter, value: state.__setitem__(names[parameter], value))
    return state, config


def load_module_weights(module: nn.Module, checkpoint: StoredCheckpoint) -> None:
    """Fill `module`, unsharded and built as the training engine's module was (the model with its
    loss or its training-only heads), with the weights of `checkpoint`. No process group needed."""
    with checkpoint.entries("model") as entries, torch.no_grad():
        for name, buffer in persistent_buffers(module).items():
            buffer.copy_(entries[name])
        put_entries(module, entries, lambda parameter, value: parameter.copy_(value))


def export_workdir(workdir: Path, output: Union[str, Path], hub_layout: bool = False,
                   repo_id: Optional[str] = None) -> None:
    """`limoe export`: the newest complete checkpoint (or the checkpoint directory `workdir`) as one
    .safetensors file with the config and the step inside, or (`hub_layout`) as a model folder in
    Hugging Face layout whose card names `repo_id` and the step. Which step that is depends on
    what has been saved, not on the config's train.steps, so the message says it."""
    output = check_output_directory(output, "--output") if hub_layout else check_output_file(output, "--output")
    refuse_overwriting_inputs({"--output": output}, checkpoint_sources(workdir))
    checkpoint = checkpoint_at(workdir)
    state, config = checkpoint_state(checkpoint)
    model = model_with(state, config, Path(workdir))
    if hub_layout:
        save_model_folder(model, config, output, repo_id, step=checkpoint.step)
    else:
        save_model_file(model, config, output, step=checkpoint.step)
    print(f"exported step {checkpoint.step} of {workdir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters) to {output}")


def latest_checkpoint(workdir: Path) -> Optional[Path]:
    """The directory of a workdir's newest complete checkpoint, or None (damaged ones logged)."""
    try:
        found = newest_complete(workdir)
    except LimoeError:
        return None
    return found.path if found is not None else None
