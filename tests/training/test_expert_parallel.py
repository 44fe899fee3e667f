"""Expert parallelism on CPU (gloo): 2 processes with ep=2 compute what 1 process computes.

Both runs start from the same weights (experts are initialised by global index), route the same
groups (router noise off, groups of whole examples), and take one AdamW step with clipping.
Scenarios: balanced routing; every token on expert 0 (rank 1's experts idle); the 2-process
run on the Triton ops (Triton's interpreter on CPU) against 1 process on the PyTorch reference;
and four steps of masked pretraining, one per task (masks drawn for the global batch, so both
runs mask the same patches and tokens; the masked-token loss is a global-batch mean).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from limoe.checkpoints.training import consolidated_state

ROOT = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_workers(outdir: Path, world_size: int, ep: int, scenario: str) -> dict:
    outdir.mkdir()
    port = str(_port())
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tests.training.ep_worker", str(outdir), str(ep), scenario],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    return json.loads((outdir / "result.json").read_text())


@pytest.fixture(scope="module", params=["balanced", "one_expert", "triton", "pretrain"])
def runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    single = run_workers(root / "single", 1, 1, request.param)
    parallel = run_workers(root / "parallel", 2, 2, request.param)
    return request.param, root, single, parallel


def test_loss_and_global_grad_norm_match_one_process(runs):
    scenario, _, single, parallel = runs
    assert parallel["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert parallel["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert single["grad_norm"] > 0.5  # the clip threshold: clipping really acted


def test_parameters_after_one_step_match_one_process(runs):
    _, root, _, _ = runs
    single, _ = consolidated_state(root / "single")
    parallel, _ = consolidated_state(root / "parallel")
    assert single.keys() == parallel.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(parallel[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_shared_weights_agree_across_ranks_and_experts_differ(runs):
    _, root, _, _ = runs
    rank0 = torch.load(root / "parallel" / "rank0.pt")
    rank1 = torch.load(root / "parallel" / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    experts = [name for name in rank0 if ".deepspeed_experts." in name]
    assert experts
    for name in rank0:
        if name not in experts:
            assert torch.equal(rank0[name], rank1[name]), name
        elif name.endswith("weight"):  # biases start at zero and an idle expert's stay there
            assert not torch.equal(rank0[name], rank1[name]), name
