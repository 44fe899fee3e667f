"""The MoE layer: a 1-expert MoE is the dense MLP; dropped tokens get exactly zero."""

import torch

from limoe.config import MoeConfig
from limoe.model.layers import Mlp
from limoe.model.moe import MoeMlp
from limoe.model.routing import IMAGE, PADDING, TEXT


def _moe(experts: int, **changes) -> MoeMlp:
    settings = {"group_size": 2, "router_noise": False, "backend": "torch", **changes}
    config = MoeConfig(num_experts=experts, layers=(0,), **settings)
    return MoeMlp(13, 29, config)


def test_one_expert_with_room_for_all_equals_the_dense_mlp_outputs_and_gradients():
    torch.manual_seed(0)
    moe = _moe(1, train_capacity_factor=1.0)  # capacity ≥ group tokens for one expert
    dense = Mlp(13, 29)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(5, 7, 13, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    modality = torch.full((5, 7), IMAGE)
    y, routing = moe(x, modality)
    torch.testing.assert_close(y, dense(x_dense))
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (dense(x_dense) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad)
    for name, parameter in dense.named_parameters():
        torch.testing.assert_close(moe.experts[0].get_parameter(name).grad, parameter.grad)
    assert routing.kept_mask.all()


def test_dropped_and_padding_tokens_get_exactly_zero_and_counts_match():
    torch.manual_seed(1)
    moe = _moe(3, train_capacity_factor=0.1)  # capacity 4 per expert per group of 2·9 tokens
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
