"""Launch a test's worker processes as one process group, without a port anyone could race for.

The test process hosts the rendezvous store itself, on a port the system picks while binding it,
and the workers join it as clients, as `torchrun` workers join their agent's store
(TORCHELASTIC_USE_AGENT_STORE). Probing for a free port and handing it to the workers would let
another process take the port in between.
"""

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[2]


def run_processes(module: str, args: list[str], world_size: int, timeout: float = 300) -> list[str]:
    """Run `python -m module *args` as ranks 0…world_size−1 of one group; returns their outputs
    and fails the test with the output of the first process that failed."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    processes = []
    for rank in range(world_size):
        env = {**child_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
               "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    del store
    return outputs


def leave_process_group() -> None:
    """End of a worker: wait for every rank, then close the group, so that no rank exits while
    another still has gloo traffic in flight to it (that aborts the other at its exit)."""
    dist.barrier()
    dist.destroy_process_group()
