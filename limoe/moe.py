"""The sparse MLP: a top-1 mixture of experts with capacity and Batch Priority Routing.

One call routes all tokens of a batch (image patches and caption tokens together, each tagged with
its modality) in groups. The compute is five ops from `kernels` — router, slot assignment,
dispatch, expert FFN, combine — so the Triton and PyTorch backends compute the same function.
With expert parallelism the expert-major buffer travels to the experts' ranks and back by
all-to-all; routing, capacity and BPR stay on the rank that owns the tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from limoe.config import MoeConfig
from limoe.losses import importance_loss, load_loss, modality_entropies, router_z_loss
from limoe.routing import (
    NUM_MODALITIES,
    PADDING,
    Grouping,
    LayerRouting,
    entropy,
    expert_capacity,
    router_noise,
)


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` is Triton on CUDA and the PyTorch reference elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


class MoeMlp(nn.Module):
    """Top-1 MoE replacing a block's MLP; each expert is a d → h → d GELU MLP.

    Expert weights are stored stacked ([E_local, …]) so the expert FFN is a batched matmul.
    `expert_parallel` (set by the trainer) shards the experts over ranks; None keeps all here.
    """

    def __init__(self, width: int, hidden: int, config: MoeConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.expert_parallel = None
        self.router = nn.Linear(width, config.num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(config.num_experts, width, hidden))
        self.b_in = nn.Parameter(torch.zeros(config.num_experts, hidden))
        self.w_out = nn.Parameter(torch.empty(config.num_experts, hidden, width))
        self.b_out = nn.Parameter(torch.zeros(config.num_experts, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like an `nn.Linear` of the same shape (and the router)."""
        for weight in (self.w_in, self.w_out):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(self.b_in if weight is self.w_in else self.b_out, -bound, bound)
        nn.init.normal_(self.router.weight, std=0.02)

    @property
    def capacity_factor(self) -> Optional[float]:
        """The train factor in training mode, else the eval one (None: dropless)."""
        return self.config.train_capacity_factor if self.training else self.config.eval_capacity_factor

    def forward(self, x: Tensor, modality: Tensor) -> tuple[Tensor, LayerRouting]:
        """x [B, N, d], modality [B, N] (0 image, 1 text, −1 padding) → y [B, N, d], routing.

        A dropped or padding token gets exactly zero here and keeps its residual stream.
        """
        batch, tokens, width = x.shape
        ops = kernels.get_ops(resolve_backend(self.config.backend, x.device))
        grouping = Grouping.for_batch(batch, self.config.group_size)
        modality = grouping.group(modality, PADDING)  # [G, S]
        groups, size = modality.shape
        flat = grouping.group(x, 0.0).reshape(groups * size, width)  # [G·S, d]

        logits = F.linear(flat.float(), self.router.weight.float())  # [G·S, E], routed in fp32
        noise = router_noise(logits, self.num_experts) if self.training and self.config.router_noise else None
        probs, expert, gate = ops.top1_router(logits, noise)  # [G·S, E], [G·S], [G·S]
        valid = modality.reshape(-1) != PADDING
        expert = torch.where(valid, expert, -1).view(groups, size)

        capacity = expert_capacity(size, self.num_experts, self.capacity_factor)
        slot = ops.assign_slots(expert, gate.view(groups, size), self.num_experts, capacity,
                                self.config.batch_priority)  # [G, S]
        group_index = torch.arange(groups, device=x.device)[:, None]
        row = torch.where(slot >= 0, expert * (groups * capacity) + group_index * capacity + slot, -1).view(-1)

        buffer = ops.dispatch(flat, row, self.num_experts * groups * capacity)  # [E·G·C, d]
        buffer = buffer.view(self.num_experts, groups * capacity, width)
        expert_out = self._run_experts(ops, buffer).reshape(-1, width)  # [E·G·C, d]
        y = ops.combine(expert_out, row, gate.to(x.dtype))  # [G·S, d]

        routing = self._routing_record(
            logits.view(groups, size, -1), noise, probs.view(groups, size, -1), modality, expert, slot, grouping, tokens, capacity
        )
        return grouping.ungroup(y.view(groups, size, width), tokens), routing

    def _run_experts(self, ops, buffer: Tensor) -> Tensor:
        """Expert FFN on [E, G·C, d]; with expert parallelism, on the local experts' slots of all ranks."""
        if self.expert_parallel is None:
            return ops.expert_ffn(buffer, self.w_in, self.b_in, self.w_out, self.b_out)
        local = self.expert_parallel.to_experts(buffer)  # [E_local, ep·G·C, d]
        local = ops.expert_ffn(local, self.w_in, self.b_in, self.w_out, self.b_out)
        return self.expert_parallel.from_experts(local)  # [E, G·C, d]

    def _routing_record(self, logits, noise, probs, modality, expert, slot, grouping, tokens, capacity) -> LayerRouting:
        """Auxiliary-loss inputs and statistics for this call. Shapes: [G, S, E] and [G, S]."""
        valid = (modality != PADDING).to(probs.dtype)  # [G, S]
        noisy_logits = logits if noise is None else logits + noise.view_as(logits)
        token_entropy, marginal_entropy, present = modality_entropies(probs, modality, NUM_MODALITIES)
        masks = torch.stack([modality == m for m in range(NUM_MODALITIES)]).to(probs.dtype)  # [M, G, S]
        chosen = F.one_hot(expert.clamp(min=0), self.num_experts).to(probs.dtype)  # [G, S, E]
        return LayerRouting(
            importance=importance_loss(probs, valid),
            load=load_loss(logits, noisy_logits, valid, 1.0 / self.num_experts),
            z=router_z_loss(logits, valid),
            token_entropy=token_entropy,
            marginal_entropy=marginal_entropy,
            present=present,
            routed=torch.einsum("mgs,gse->me", masks, chosen),
            kept=torch.einsum("mgs,gse->me", masks * (slot >= 0), chosen),
            prob_sum=torch.einsum("mgs,gse->me", masks, probs.detach()),
            entropy_sum=torch.einsum("mgs,gs->m", masks, entropy(probs.detach())),
            expert=grouping.ungroup(expert, tokens),
            kept_mask=grouping.ungroup(slot >= 0, tokens),
            capacity=capacity,
            num_groups=expert.shape[0],
        )
