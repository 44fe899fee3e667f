"""The MoE layer: a 1-expert MoE is the dense MLP; dropped tokens get exactly zero; both backends
compute the same layer; V-MoE's initialisation; a sharded layer holds the unsharded layer's experts."""

import math

import pytest
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param

from limoe.checkpoints.expert_entries import expert_checkpoint_entries
from limoe.config import MoeConfig
from limoe.distributed import ExpertSharding
from limoe.model.layers import Mlp
from limoe.model.moe import EXPERT_PARAMETERS, MoeMlp
from limoe.modalities import PADDING

IMAGE, TEXT = 0, 1  # an image-text model's modality ids


def _moe(experts: int, sharding: ExpertSharding = ExpertSharding(), **changes) -> MoeMlp:
    settings = {"group_size": 2, "router_noise": False, "backend": "torch", **changes}
    config = MoeConfig(num_experts=experts, layers=(0,), **settings)
    return MoeMlp(13, 29, config, sharding)


def test_one_expert_with_room_for_all_equals_the_dense_mlp_outputs_and_gradients():
    torch.manual_seed(0)
    moe = _moe(1, train_capacity_factor=1.0)  # capacity ≥ group tokens for one expert
    dense = Mlp(13, 29)
    with torch.no_grad():
        for name in EXPERT_PARAMETERS:
            getattr(moe, name)[0] = dense.get_parameter(name.replace("_", "."))
    x = torch.randn(5, 7, 13, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    modality = torch.full((5, 7), IMAGE)
    y, routing = moe(x, modality)
    torch.testing.assert_close(y, dense(x_dense))
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (dense(x_dense) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad)
    for name in EXPERT_PARAMETERS:
        torch.testing.assert_close(getattr(moe, name).grad[0], dense.get_parameter(name.replace("_", ".")).grad)
    assert routing.kept_mask.all()


def test_dropped_and_padding_tokens_get_exactly_zero_and_counts_match():
    torch.manual_seed(1)
    moe = _moe(3, train_capacity_factor=0.1, expert_init="independent")  # capacity 4 per expert per group of 2·9 tokens
    x = torch.randn(4, 9, 13)
    modality = torch.full((4, 9), TEXT)
    modality[:, :5] = IMAGE
    modality[:, -1] = PADDING
    y, routing = moe(x, modality)
    dropped = ~routing.kept_mask
    assert dropped.any() and routing.kept_mask.any()
    assert (y[dropped] == 0).all()
    assert (y[routing.kept_mask].abs().sum(-1) > 0).all()
    assert (routing.expert[:, -1] == -1).all() and not routing.kept_mask[:, -1].any()
    assert routing.kept.sum() == routing.kept_mask.sum()
    assert routing.routed.sum() == (modality != PADDING).sum()
    # No expert holds more than its capacity in any group.
    assert routing.kept.sum(0).max() <= routing.capacity * 2


def test_gradients_reach_router_and_every_expert():
    torch.manual_seed(2)
    moe = _moe(4, train_capacity_factor=2.0, router_noise=True)
    x = torch.randn(6, 11, 13, requires_grad=True)
    y, routing = moe(x, torch.full((6, 11), IMAGE))
    (y.square().sum() + routing.importance + routing.load).backward()
    for name, parameter in moe.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_triton_and_torch_backends_compute_the_same_layer_and_record():
    """The layer on each op set (Triton in its interpreter on CPU): outputs, every field of the
    routing record, and gradients through the output and the auxiliary losses."""
    torch.manual_seed(3)
    x = torch.randn(5, 9, 13)
    modality = torch.full((5, 9), TEXT)
    modality[:, :6] = IMAGE
    modality[1, -2:] = PADDING
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(4)
        moe = _moe(3, router_noise=True, expert_init="independent", backend=backend)
        leaf = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same router noise
        y, routing = moe(leaf, modality)
        loss = (y * torch.linspace(-1, 1, 13)).sum() + routing.importance + routing.load + routing.z
        (loss + routing.token_entropy.sum() + routing.marginal_entropy.sum()).backward()
        results.append((y, routing, leaf.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (y, routing, dx, grads), (y_t, routing_t, dx_t, grads_t) = results
    torch.testing.assert_close(y_t, y, rtol=1e-4, atol=1e-5)
    for field in ("importance", "load", "z", "token_entropy", "marginal_entropy", "routed", "kept", "prob_sum",
                  "entropy_sum"):
        torch.testing.assert_close(getattr(routing_t, field), getattr(routing, field), msg=field)
    for field in ("present", "expert", "kept_mask"):
        assert torch.equal(getattr(routing_t, field), getattr(routing, field)), field
    torch.testing.assert_close(dx_t, dx, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_t[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_experts_share_their_initialisation_by_default_and_the_router_is_lecun_normal():
    torch.manual_seed(6)
    moe = MoeMlp(256, 64, MoeConfig(num_experts=4, layers=(0,)))
    for name in ("fc1_weight", "fc2_weight"):
        weights = getattr(moe, name)
        assert all(torch.equal(weights[0], weights[e]) for e in range(1, 4)), name
        assert weights[0].std() > 0.01
    assert (moe.fc1_bias == 0).all() and (moe.fc2_bias == 0).all()
    std = 1 / math.sqrt(256)  # lecun normal: variance 1/fan_in, truncated at two (raw) standard deviations
    assert moe.router_weight.std().item() == pytest.approx(std, rel=0.1)
    assert moe.router_weight.abs().max() <= 2 * std / 0.87962566103423978
    independent = MoeMlp(256, 64, MoeConfig(num_experts=4, layers=(0,), expert_init="independent"))
    assert not torch.equal(independent.fc1_weight[0], independent.fc1_weight[1])


@pytest.mark.parametrize("expert_init", ["shared", "independent"])
def test_a_sharded_layer_starts_from_the_unsharded_layers_experts(expert_init):
    config = MoeConfig(num_experts=4, layers=(0,), expert_init=expert_init)
    torch.manual_seed(7)
    whole = MoeMlp(13, 29, config)
    shards = []
    for rank in range(2):
        torch.manual_seed(7)
        shards.append(MoeMlp(13, 29, config, ExpertSharding(2, rank)))
    whole_entries = expert_checkpoint_entries(whole, lambda p: p.detach())
    shard_entries = [expert_checkpoint_entries(s, lambda p: p.detach()) for s in shards]
    assert whole_entries.keys() == shard_entries[0].keys() | shard_entries[1].keys()
    assert not shard_entries[0].keys() & shard_entries[1].keys()
    for name, tensor in whole_entries.items():
        torch.testing.assert_close(next(e[name] for e in shard_entries if name in e), tensor)
    torch.testing.assert_close(shards[1].router_weight, whole.router_weight)


def test_deepspeed_knows_the_layer_and_its_expert_parameters():
    moe = _moe(4, ExpertSharding(2, 0))
    assert isinstance(moe, MoE) and moe.num_local_experts == 2
    names = {name for name, p in moe.named_parameters() if is_moe_param(p)}
    assert names == set(EXPERT_PARAMETERS)
    assert {p.group_name for p in moe.expert_parameters()} == {"ep_size_2"}
    assert not is_moe_param(moe.router_weight)
    assert moe.fc1_weight.shape == (2, 29, 13) and moe.fc2_weight.shape == (2, 13, 29)
