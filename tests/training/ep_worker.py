"""One process of a distributed training-step check, launched by test_expert_parallel.py.

Builds the demo model through the trainer's own functions, takes one optimizer step on its
slice of a fixed global batch, saves a training checkpoint, and writes what the test compares.
The `pretrain` scenario takes four steps of the masked-pretraining objective instead, one of each
task (masked image, masked text, each given the other).
Run as: python -m tests.training.ep_worker OUTDIR EXPERT_PARALLEL_SIZE SCENARIO (rank from env).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from limoe.checkpoints import training as checkpoint
from limoe.config import dump_config, load_config
from limoe.pretraining.objective import MaskedPretraining
from limoe.training.trainer import ContrastiveTrainer, build_engine, start_session, train_step

GLOBAL_BATCH = 16
OVERRIDES = [
    "model.moe.router_noise=false",  # noise would differ between the runs
    "model.moe.group_size=4",  # 16 examples → the same 4 routing groups on 1 or 2 ranks
    "model.moe.train_capacity_factor=1.0",
    f"train.batch_size={GLOBAL_BATCH}",
    "train.device=cpu",
    "optim.warmup_steps=1",
    "optim.lr=0.01",
    "optim.eps=1.0e-3",  # Adam's first step is g/(|g|+eps): a tiny eps turns rounding noise into ±lr
    "optim.grad_clip=0.5",  # below the first step's norm, so clipping acts
    "data.workers=0",
]
PRETRAIN = ["train.steps=4", "pretrain.unimodal_steps=2", "pretrain.bimodal_steps=2", "pretrain.decoder_width=32",
            "pretrain.decoder_depth=1", "pretrain.decoder_heads=2"]


def fixed_batch(config) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    size = config.model.image_size
    images = torch.randn(GLOBAL_BATCH, 3, size, size, generator=generator)
    tokens = torch.randint(1, 1000, (GLOBAL_BATCH, config.model.context_length), generator=generator)
    tokens[:, 9:] = 0
    return images, tokens


def main(outdir: Path, expert_parallel_size: int, scenario: str) -> None:
    overrides = OVERRIDES + [f"distributed.expert_parallel_size={expert_parallel_size}"]
    if scenario == "triton" and expert_parallel_size > 1:  # the Triton ops (interpreted on CPU) against the reference
        overrides.append("model.moe.backend=triton")
    if scenario == "pretrain":
        overrides += PRETRAIN
    config = load_config("demo", overrides)
    session = start_session(config)
    engine = build_engine(config, session, MaskedPretraining if scenario == "pretrain" else ContrastiveTrainer)
    if scenario == "one_expert":  # equal logits: every token picks expert 0, so rank 1's experts idle
        for moe in engine.module.model.moe_blocks:
            moe.router_weight.data.zero_()
    images, tokens = fixed_batch(config)
    local = slice(session.rank * GLOBAL_BATCH // session.world_size, (session.rank + 1) * GLOBAL_BATCH // session.world_size)
    loss = torch.zeros(())
    for step in range(config.train.steps if scenario == "pretrain" else 1):
        terms, routing, _ = train_step(engine, images[local], tokens[local], config, step)
        loss += terms["loss"]
    dist.all_reduce(loss)
    torch.save(engine.module.model.state_dict(), outdir / f"rank{session.rank}.pt")
    if session.rank == 0:
        dump_config(config, outdir / "config.yaml")
    checkpoint.save_training_checkpoint(engine, outdir, 1, {"step": 1}, keep=1)
    if session.rank == 0:
        kept = sum(int(r.kept.sum()) for r in routing)
        result = {"loss": loss.item() / session.world_size, "grad_norm": terms["grad_norm"].item(),
                  "kept_tokens_rank0": kept}
        (outdir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
