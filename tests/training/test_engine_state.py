"""The plan's state arithmetic (limoe.plan.state) against the tensors a real DeepSpeed engine holds.

Here rather than in tests/plan because it builds an engine, and so a process group, in the test
process, as the other trainer tests do."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from limoe.config import load_config
from limoe.plan.state import count_parameters, state_bytes
from limoe.training.session import start_session
from limoe.training.step import train_step
from limoe.training.trainer import build_engine


def test_optimizer_state_bytes_are_what_a_zero1_engine_holds():
    """One CPU process: ZeRO 1's fp32 master partition and AdamW moments, counted in the engine."""
    config = load_config("demo", ["train.batch_size=8", "train.device=cpu", "distributed.zero_stage=1"])
    engine = build_engine(config, start_session(config))
    images, tokens = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8), torch.randint(1, 1000, (8, 16))
    train_step(engine, images, tokens, config)
    zero = engine.optimizer
    held = {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes() for t in zero.single_partition_of_fp32_groups}
    for state in zero.optimizer.state.values():
        held.update({StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes()
                     for t in state.values() if torch.is_tensor(t) and t.numel() > 1})
    planned = state_bytes(count_parameters(config), gpus=1, expert_parallel=1, zero_stage=1, zero_bucket_elements=0)
    assert planned.optimizer == pytest.approx(sum(held.values()), rel=0.01)  # DeepSpeed pads partitions a little
