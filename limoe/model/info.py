"""`limoe info`: what a config builds, in numbers, without allocating it (meta device)."""

from __future__ import annotations

import torch

from limoe.config import ModelConfig
from limoe.model.tower import Limoe, parameter_counts


def _millions(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def describe_model(config: ModelConfig) -> str:
    """A short multi-line description: sizes, MoE placement, routing settings, parameter counts."""
    with torch.device("meta"):
        total, per_token = parameter_counts(Limoe(config))
    moe = config.moe
    eval_factor = "dropless" if moe.eval_capacity_factor is None else moe.eval_capacity_factor
    lines = [
        f"model            {config.name}{' (dense twin)' if config.dense else ''}",
        f"tower            width {config.width}, depth {config.depth}, heads {config.heads}, mlp {config.mlp_dim}",
        f"image            {config.image_size}px, patch {config.patch_size} ({config.num_patches} patches), "
        f"pool {config.image_pool}",
        f"text             {config.context_length} tokens, vocabulary {config.vocab_size}, pool {config.text_pool}",
        f"joint embedding  {config.embed_dim}",
    ]
    if "audio" in config.modalities:
        audio = config.audio
        lines.insert(-1, f"audio            {audio.clip_seconds:g} s at {audio.sample_rate} Hz, {audio.n_mels} mel bins, "
                         f"patch {audio.patch_size} ({audio.num_patches} patches), pool {audio.pool}")
    if config.modality_adapter_layers:
        lines.append(f"adapter blocks   the first {config.modality_adapter_layers}, one copy per modality")
    if config.moe_layers:
        lines += [
            f"MoE blocks       {list(config.moe_layers)} ({len(config.moe_layers)} of {config.depth})",
            f"experts          {moe.num_experts}, top-{moe.top_k}, routing group {moe.group_size} examples, "
            f"{'batch priority' if moe.batch_priority else 'first-come'} routing",
            f"capacity factor  train {moe.train_capacity_factor}, eval {eval_factor}",
        ]
    else:
        lines.append("MoE blocks       none (dense)")
    lines.append(f"parameters       {_millions(total)} total, {_millions(per_token)} applied per token")
    return "\n".join(lines)
