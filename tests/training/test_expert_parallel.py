"""Expert parallelism on CPU (gloo): 2 processes with ep=2 compute what 1 process computes.

Both runs start from the same weights (experts are initialised by global index), route the same
groups (router noise off, groups of whole examples), and take one AdamW step with clipping.
Step scenarios: balanced routing; every token on expert 0 (rank 1's experts idle); the 2-process
run on the Triton ops (Triton's interpreter on CPU) against 1 process on the PyTorch reference;
ZeRO stages 1 and 2 against 1 process without ZeRO (stage 2 also over micro-batches with the MoE
blocks checkpointed); four steps of masked pretraining, one per task (masks drawn for the global
batch, so both runs mask the same patches and tokens; the masked-token loss is a global-batch mean).
On 2 processes, the gradient of a batch is
also the same per parameter whether it is taken whole, in micro-batches of a quarter, under
activation checkpointing, or with the global instead of the local contrastive loss.
All scenarios of a world size run in one launch of ep_worker.py.
"""

import json
from pathlib import Path

import pytest
import torch

from limoe.checkpoints.training import consolidated_state
from limoe.model.moe import EXPERT_PARAMETERS
from tests.training.processes import run_processes

SINGLE = ["balanced", "one_expert", "triton", "pretrain"]
PARALLEL = ["balanced", "one_expert", "triton", "pretrain", "zero1", "zero2", "zero2_micro", "gradients"]
REFERENCE = {"balanced": "balanced", "one_expert": "one_expert", "triton": "triton", "pretrain": "pretrain", "zero1": "balanced",
             "zero2": "balanced", "zero2_micro": "balanced"}


def run_workers(outdir: Path, world_size: int, ep: int, scenarios: list[str]) -> Path:
    """Run `world_size` workers through all `scenarios`, writing their results under `outdir`."""
    outdir.mkdir()
    run_processes("tests.training.ep_worker", [str(outdir), str(ep), ",".join(scenarios)], world_size, timeout=900)
    return outdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("expert_parallel")
    return run_workers(root / "single", 1, 1, SINGLE), run_workers(root / "parallel", 2, 2, PARALLEL)


def _result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


@pytest.mark.parametrize("scenario", list(REFERENCE))
def test_loss_global_grad_norm_and_parameters_after_the_steps_match_one_process(runs, scenario):
    single_root, parallel_root = runs
    single, parallel = single_root / REFERENCE[scenario], parallel_root / scenario
    assert _result(parallel)["loss"] == pytest.approx(_result(single)["loss"], rel=1e-5)
    assert _result(parallel)["grad_norm"] == pytest.approx(_result(single)["grad_norm"], rel=1e-5)
    assert _result(single)["grad_norm"] > 0.5  # the clip threshold: clipping really acted
    reference, _ = consolidated_state(single)
    state, _ = consolidated_state(parallel)
    assert reference.keys() == state.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_shared_weights_agree_across_ranks_and_experts_differ(runs):
    for scenario in ("balanced", "one_expert"):
        rank0 = torch.load(runs[1] / scenario / "rank0.pt")
        rank1 = torch.load(runs[1] / scenario / "rank1.pt")
        assert rank0.keys() == rank1.keys()
        experts = [name for name in rank0 if name.rsplit(".", 1)[-1] in EXPERT_PARAMETERS]
        assert experts
        for name in rank0:
            if name not in experts:
                assert torch.equal(rank0[name], rank1[name]), name
            elif name.endswith("weight"):  # biases start at zero and an idle expert's stay there
                assert not torch.equal(rank0[name], rank1[name]), name


@pytest.mark.parametrize("variant", ["micro_batches", "checkpoint_all", "checkpoint_moe_micro", "global_loss"])
def test_every_parameters_gradient_is_the_whole_batchs(runs, variant):
    """fp32; per parameter, every element within 1e-5 × its largest gradient element (summation order:
    micro-batches add partial gradients in another order)."""
    for rank in range(2):
        whole = torch.load(runs[1] / "gradients" / f"whole_batch_rank{rank}.pt")
        other = torch.load(runs[1] / "gradients" / f"{variant}_rank{rank}.pt")
        torch.testing.assert_close(other["loss"], whole["loss"], rtol=1e-6, atol=0)
        assert other["grads"].keys() == whole["grads"].keys()
        for name, grad in whole["grads"].items():
            torch.testing.assert_close(other["grads"][name], grad, rtol=0, atol=1e-5 * grad.abs().max().item(),
                                       msg=f"rank {rank} {name}")


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step_on_two_processes(tmp_path):
    """The tower on the Triton ops traces as one graph with the expert all-to-all in it (the worker
    compiles it with fullgraph=True), and under torch.compile (aot_eager: the traced graphs run op
    by op) takes the eager step: loss and parameters after it agree to 1e-5."""
    run_workers(tmp_path / "compiled", 2, 2, ["compiled"])
    for rank in range(2):
        eager = torch.load(tmp_path / "compiled" / "compiled" / f"eager_rank{rank}.pt")
        compiled = torch.load(tmp_path / "compiled" / "compiled" / f"compiled_rank{rank}.pt")
        torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-5, atol=1e-6)
        for name, parameter in eager["parameters"].items():
            torch.testing.assert_close(compiled["parameters"][name], parameter, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_zero_with_each_expert_on_two_gpus_matches_one_process(runs, tmp_path):
    """4 processes, ep=2: each expert lives on 2 ranks, so ZeRO partitions its gradient and optimizer
    state over them and must count each partition once in the global norm."""
    run_workers(tmp_path / "four", 4, 2, ["zero1", "zero2"])
    single = runs[0] / "balanced"
    reference, _ = consolidated_state(single)
    for scenario in ("zero1", "zero2"):
        parallel = tmp_path / "four" / scenario
        assert _result(parallel)["loss"] == pytest.approx(_result(single)["loss"], rel=1e-5)
        assert _result(parallel)["grad_norm"] == pytest.approx(_result(single)["grad_norm"], rel=1e-5)
        state, _ = consolidated_state(parallel)
        for name, tensor in reference.items():
            torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{scenario} {name}")
