"""One process of the distributed training checks, launched by test_expert_parallel.py.

Runs several scenarios in one launch (a process start costs more than a scenario), each building
the demo model through the trainer's own functions on its slice of a fixed global batch:
- step scenarios take one optimizer step, save a training checkpoint and write what the test
  compares with one process: `balanced`, `one_expert` (every token on expert 0: rank 1's experts
  idle), `triton` (the Triton ops, interpreted on CPU, against one process on the reference),
  `zero1`, `zero2` (DeepSpeed's ZeRO, whose clipping must use the true global norm), `zero2_micro`
  (the same over micro-batches, with the MoE blocks checkpointed), `pretrain` (four steps of masked
  pretraining, one of each task: masked image, masked text, each given the other);
- `gradients` saves this rank's reduced gradient per parameter for variants of one batch that
  must agree: the whole batch, micro-batches of a quarter, activation checkpointing, the global
  (not local) contrastive loss;
- `compiled` traces the tower on the Triton ops as one graph, then saves the parameters after one
  step with the tower under torch.compile, and eagerly.
Run as: python -m tests.training.ep_worker OUTDIR EXPERT_PARALLEL_SIZE SCENARIO[,SCENARIO…] (rank from env).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from limoe.checkpoints import training as checkpoint
from limoe.config import dump_config, load_config
from limoe.pretraining.objective import MaskedPretraining
from limoe.training.session import start_session
from limoe.training.step import forward_backward, train_step
from limoe.training.trainer import build_engine
from tests.helpers import COMPARABLE, fixed_batch, rank_rows
from tests.training.processes import leave_process_group

STEP_SCENARIOS = {
    "balanced": [],
    "one_expert": [],
    "triton": [],
    "zero1": ["distributed.zero_stage=1"],
    "zero2": ["distributed.zero_stage=2"],
    # ZeRO 2 reducing partitioned gradients over micro-batches, MoE blocks recomputed in backward
    "pretrain": ["train.steps=4", "pretrain.unimodal_steps=2", "pretrain.bimodal_steps=2", "pretrain.decoder_width=32",
                 "pretrain.decoder_depth=1", "pretrain.decoder_heads=2"],
    "zero2_micro": ["distributed.zero_stage=2", "train.micro_batch_size=2", "train.activation_checkpointing=moe"],
}
GRADIENT_VARIANTS = {
    "whole_batch": [],
    "micro_batches": ["train.micro_batch_size=2"],  # a quarter of the 8 pairs per rank
    "checkpoint_all": ["train.activation_checkpointing=all"],
    "checkpoint_moe_micro": ["train.activation_checkpointing=moe", "train.micro_batch_size=4"],
    "global_loss": ["loss.local_loss=false"],
}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[rank_rows(dist.get_rank(), dist.get_world_size())]


def _config(expert_parallel_size: int, extra: list[str]):
    return load_config("demo", COMPARABLE + [f"distributed.expert_parallel_size={expert_parallel_size}", *extra])


def step_scenario(outdir: Path, expert_parallel_size: int, scenario: str) -> None:
    extra = list(STEP_SCENARIOS[scenario])
    if scenario == "triton" and expert_parallel_size > 1:  # the Triton ops (interpreted on CPU) against the reference
        extra.append("model.moe.backend=triton")
    config = _config(expert_parallel_size, extra)
    session = start_session(config)
    engine = build_engine(config, session, **({"objective": MaskedPretraining} if scenario == "pretrain" else {}))
    if scenario == "one_expert":  # equal logits: every token picks expert 0, so rank 1's experts idle
        for moe in engine.module.model.moe_blocks:
            moe.router_weight.data.zero_()
    images, tokens = fixed_batch(config)
    loss = torch.zeros(())
    for step in range(config.train.steps if scenario == "pretrain" else 1):
        terms, routing, _ = train_step(engine, _local(images), _local(tokens), config, step)
        loss += terms["loss"]
    dist.all_reduce(loss)
    outdir.mkdir(exist_ok=True)
    torch.save(engine.module.model.state_dict(), outdir / f"rank{session.rank}.pt")
    if session.rank == 0:
        dump_config(config, outdir / "config.yaml")
    checkpoint.save_training_checkpoint(engine, outdir, config.train.steps if scenario == "pretrain" else 1, config,
                                        objective=engine.module.name)
    if session.rank == 0:
        kept = sum(int(r.kept.sum()) for r in routing)
        result = {"loss": loss.item() / session.world_size, "grad_norm": terms["grad_norm"].item(),
                  "kept_tokens_rank0": kept}
        (outdir / "result.json").write_text(json.dumps(result))


def gradients_scenario(outdir: Path, expert_parallel_size: int) -> None:
    outdir.mkdir(exist_ok=True)
    for variant, extra in GRADIENT_VARIANTS.items():
        config = _config(expert_parallel_size, extra)
        engine = build_engine(config, start_session(config))
        images, tokens = fixed_batch(config)
        terms, _, _ = forward_backward(engine, _local(images), _local(tokens), config)
        loss = terms["loss"].clone()
        dist.all_reduce(loss)
        grads = {name: p.grad.clone() for name, p in engine.module.named_parameters()}
        torch.save({"loss": loss / dist.get_world_size(), "grads": grads}, outdir / f"{variant}_rank{dist.get_rank()}.pt")


def compiled_scenario(outdir: Path, expert_parallel_size: int) -> None:
    outdir.mkdir(exist_ok=True)
    # On the GPU's op set (the Triton ops, interpreted here) the tower traces as one graph, forward and
    # backward, the expert all-to-all included: fullgraph=True fails on any graph break.
    config = _config(expert_parallel_size, ["model.moe.backend=triton"])
    model = build_engine(config, start_session(config)).module.model
    images, tokens = fixed_batch(config)
    output = torch.compile(model, backend="aot_eager", fullgraph=True)(_local(images).float(), _local(tokens))
    (output.image_features.sum() + output.text_features.sum()).backward()
    for variant, extra in {"eager": [], "compiled": ["train.compile=true"]}.items():
        config = _config(expert_parallel_size, extra)
        engine = build_engine(config, start_session(config), compile_backend="aot_eager")
        images, tokens = fixed_batch(config)
        terms, _, _ = train_step(engine, _local(images), _local(tokens), config)
        state = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
        torch.save({"loss": terms["loss"], "parameters": state}, outdir / f"{variant}_rank{dist.get_rank()}.pt")


def main(outdir: Path, expert_parallel_size: int, scenarios: list[str]) -> None:
    for scenario in scenarios:
        if scenario == "gradients":
            gradients_scenario(outdir / scenario, expert_parallel_size)
        elif scenario == "compiled":
            compiled_scenario(outdir / scenario, expert_parallel_size)
        else:
            step_scenario(outdir / scenario, expert_parallel_size, scenario)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","))
    leave_process_group()
