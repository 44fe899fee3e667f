"""How checkpoints name experts: one entry per global expert under DeepSpeed's per-expert names, so
the entries are the same for any expert-parallel size, and a whole state in that naming stacks
back into the layers' tensors."""

import pytest
import torch

from limoe.checkpoints.expert_entries import expert_checkpoint_entries, restore_expert_entries, stacked_experts
from limoe.config import MoeConfig
from limoe.distributed import ExpertSharding
from limoe.errors import LimoeError
from limoe.model.moe import EXPERT_PARAMETERS, MoeMlp


def moe_layer(experts: int, sharding: ExpertSharding = ExpertSharding(), **changes) -> MoeMlp:
    settings = {"group_size": 2, "router_noise": False, "backend": "torch", **changes}
    return MoeMlp(13, 29, MoeConfig(num_experts=experts, layers=(0,), **settings), sharding)


def per_expert_state(moe: MoeMlp, prefix: str) -> dict[str, torch.Tensor]:
    """What DeepSpeed's one-module-per-expert layer held: Linear weights per expert, the gate wg."""
    state = {f"{prefix}deepspeed_moe.gate.wg.weight": moe.router_weight.detach().clone()}
    for index in range(moe.num_local_experts):
        for name in EXPERT_PARAMETERS:
            linear, kind = name.split("_")
            state[f"{prefix}deepspeed_moe.experts.deepspeed_experts.{index}.{linear}.{kind}"] = getattr(moe, name)[index].detach().clone()
    return state


def test_checkpoint_entries_are_per_expert_and_restore_on_another_expert_parallel_size():
    """Entries name each global expert as DeepSpeed's per-expert layer did (so older checkpoints read
    back); an ep=1 layer's entries restore into rank 1 of ep=2 as its rows, a step as a scalar."""
    torch.manual_seed(9)
    whole = moe_layer(4, expert_init="independent")
    entries = expert_checkpoint_entries(whole, lambda p: p.detach())
    assert entries.keys() == per_expert_state(whole, "").keys() - {"deepspeed_moe.gate.wg.weight"}
    shard = moe_layer(4, ExpertSharding(2, 1))
    restored = {}
    restore_expert_entries(shard, entries, lambda p, value: restored.__setitem__(p, value))
    for name in EXPERT_PARAMETERS:
        torch.testing.assert_close(restored[getattr(shard, name)], getattr(whole, name)[2:].detach())
    steps = expert_checkpoint_entries(whole, lambda p: torch.tensor(3.0))
    restore_expert_entries(shard, steps, lambda p, value: restored.__setitem__(p, value))
    assert all(restored[p].shape == () and restored[p] == 3.0 for p in shard.expert_parameters())


def test_a_state_in_per_expert_names_stacks_into_the_layers_tensors():
    torch.manual_seed(8)
    moe = moe_layer(3, expert_init="independent")
    entries = {f"blocks.1.mlp.{name}": value
               for name, value in expert_checkpoint_entries(moe, lambda p: p.detach()).items()}
    state = {"blocks.0.norm.weight": torch.ones(2), "blocks.1.mlp.router_weight": moe.router_weight.detach(), **entries}
    stacked = stacked_experts(state)
    assert set(stacked) == {"blocks.0.norm.weight", "blocks.1.mlp.router_weight",
                            *(f"blocks.1.mlp.{n}" for n in EXPERT_PARAMETERS)}
    for name, tensor in moe.state_dict().items():
        torch.testing.assert_close(stacked[f"blocks.1.mlp.{name}"], tensor)
    del state["blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.fc2.bias"]
    with pytest.raises(LimoeError, match=r"fc2_bias: the checkpoint lacks expert\(s\) \[1\]"):
        stacked_experts(state)
