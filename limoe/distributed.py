"""Devices, process groups and the expert-parallel exchange.

DeepSpeed owns the process groups (`deepspeed.init_distributed`, and its expert-parallel and
expert-data-parallel groups from `deepspeed.utils.groups`); this module holds the all-to-all
that carries the expert-major token buffer to the experts' ranks and back, and small helpers
for rank-aware code. The all-to-all is torch's functional collective, which `torch.compile`
traces into the graph (with its backward, the reverse all-to-all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from limoe.errors import LimoeError


@dataclass(frozen=True)
class ExpertSharding:
    """Which experts this rank holds: experts are split in `size` contiguous chunks, chunk `rank` here.

    DeepSpeed's expert-parallel groups are consecutive ranks ([0, 1], [2, 3], … for ep = 2), so
    a process's expert-parallel rank is its global rank modulo ep.
    """

    size: int = 1
    rank: int = 0

    def global_index(self, local_index: int, local_experts: int) -> int:
        return self.rank * local_experts + local_index

    @classmethod
    def for_process(cls, expert_parallel_size: int) -> "ExpertSharding":
        return cls(expert_parallel_size, rank_and_world()[0] % expert_parallel_size)


def expert_parallel_group(config):
    """DeepSpeed's expert-parallel group of this process (None without expert parallelism)."""
    from deepspeed.utils import groups

    size = config.distributed.expert_parallel_size
    return groups._get_expert_parallel_group(f"ep_size_{size}") if size > 1 else None


def experts_all_to_all(buffer: Tensor, group) -> Tensor:
    """[E, N, d] in global expert order → [E_local, ep·N, d]: every rank's slots for my experts.

    Rank r owns experts r·E_local … (r+1)·E_local − 1, i.e. chunk r of the expert axis.
    Received rows are ordered by source rank, so the way back is the inverse permutation.
    """
    ep = dist.get_world_size(group)
    experts, slots, width = buffer.shape
    received = all_to_all_single_autograd(buffer.contiguous(), None, None, group)  # [ep·E_l, N, d]
    received = received.view(ep, experts // ep, slots, width)  # [source rank, E_l, N, d]
    return received.transpose(0, 1).reshape(experts // ep, ep * slots, width)


def experts_all_to_all_back(local: Tensor, group) -> Tensor:
    """[E_local, ep·N, d] expert outputs → [E, N, d] for this rank's tokens, global expert order."""
    ep = dist.get_world_size(group)
    local_experts, total_slots, width = local.shape
    slots = total_slots // ep
    outgoing = local.view(local_experts, ep, slots, width).transpose(0, 1).contiguous()  # [dest rank, E_l, N, d]
    returned = all_to_all_single_autograd(outgoing, None, None, group)  # [source rank, E_l, N, d]
    return returned.view(ep * local_experts, slots, width)


def experts_all_to_all_counts(counts: Tensor, group) -> Tensor:
    """[E] rows this rank sends each expert (global order) → [E_local, ep]: the rows every source
    rank sent each of my experts, in the layout `experts_all_to_all` delivers them."""
    ep = dist.get_world_size(group)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)  # [source rank · E_local]
    return received.view(ep, -1).t().contiguous()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device: str, option: str = "--device") -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error naming `option`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LimoeError(f"{option} cuda was given but no CUDA GPU is visible; use {option} cpu or auto.")
    return device


def init_process_group(backend: str, timeout_minutes: int) -> tuple[int, int, int]:
    """Join the launcher's process group, or make a one-process group; → (rank, world, local rank).

    `deepspeed` and `torchrun` set RANK, WORLD_SIZE, LOCAL_RANK and the master address; a plain
    `limoe train` gets a one-process group whose store listens on a port the system picks while
    binding it (probing for a free port and binding later would race other processes for it).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if backend == "gloo":
        # DeepSpeed compiles a shared-memory all-reduce for CPU inference on first use (a minute of
        # C++ build); gloo needs none of it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ:
        store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timeout)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group made above
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _flag_device() -> torch.device:
    """Where a tensor must live for a collective: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (every process must call; True without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=_flag_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_first_process(value: int) -> int:
    """Process 0's `value` on every process (every process must call)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_flag_device())
    dist.broadcast(tensor, src=0)
    return int(tensor.item())
