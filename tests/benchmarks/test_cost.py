"""The CPU cost count of one MoE block against its dense twin, and the budget the expert layer
must stay within: at most 40 more launches and 4 more activation passes per MoE layer
(limoe-tiny shapes, 8 experts, Triton ops in the interpreter, bf16 autocast)."""

import pytest
import torch

from limoe.benchmarks.cost import block_costs, count, main
from limoe.config import load_model_config

EXTRA_LAUNCHES = 40
EXTRA_PASSES = 4.0


def test_counts_launches_and_activation_bytes_by_hand():
    """Views and allocations are free; every other op is a launch; outputs with at least one
    element per token count, except weight-shaped ones; filling an allocation in place is no
    second write."""
    a, b = torch.randn(10, 4), torch.randn(10, 4)

    def step():
        total = (a + b).t().sum(dim=1)  # add (writes [10, 4]), view, sum (writes [4]: below 10 elements)
        torch.empty(10, 4).copy_(a)  # one allocation, one write
        torch.randn(4, 4)  # weight-shaped
        return total

    cost = count(step, tokens=10, weight_shapes={(4, 4)})
    assert cost.ops == {"add": 1, "sum": 1, "copy_": 1, "randn": 1}
    assert cost.launches == 4
    assert cost.activation_bytes == 2 * 10 * 4 * 4


@pytest.mark.parametrize("batch", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_moe_block_stays_within_its_budget_over_the_dense_block(batch):
    config = load_model_config("limoe-tiny", ["moe.num_experts=8", "moe.backend=triton"])
    moe, dense, unit = block_costs(config, batch)
    assert dense.launches > 40 and any(op.startswith("triton:") for op in moe.ops)  # both really counted
    extra_launches = moe.launches - dense.launches
    extra_passes = (moe.activation_bytes - dense.activation_bytes) / unit
    assert extra_launches <= EXTRA_LAUNCHES, moe.ops.most_common()
    assert extra_passes <= EXTRA_PASSES, {op: b / unit for op, b in moe.bytes_by_op.most_common()}


def test_command_prints_the_table(capsys):
    assert main(["--batch", "2", "--experts", "4", "--backend", "torch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["block", "launches", "activation", "passes"]
    assert [line.split()[0] for line in lines[2:5]] == ["moe", "dense", "extra"]
