"""`model.moe`, the expert layers' section, and V-MoE's placements (`every N`, `last N`) that YAML
may write instead of block indices: `resolve_layer_spec` turns them into indices once the loader
knows the model's depth, so the dataclass only ever holds explicit indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from limoe.config.keys import setting
from limoe.errors import LimoeError


@dataclass(frozen=True)
class MoeConfig:
    """Sparse expert layers: where they sit and how tokens are routed to them.

    `layers` is resolved to explicit block indices; YAML may write `every 2` (blocks 1, 3, 5, …)
    or `last N` (the last N of those), as V-MoE does.
    """

    num_experts: int = setting(8, "experts per MoE layer (E)", "[1, inf)")
    layers: tuple[int, ...] = setting((), "0-based blocks whose MLP is a mixture of experts; YAML may write "
                                      "'every 2' (blocks 1, 3, 5, …) or 'last N' (the last N of those)", "[0, inf)")
    top_k: int = setting(1, "experts each token is sent to (only top-1 is implemented)", "[1, inf)")
    group_size: int = setting(8, "examples per routing group; their image and text tokens compete for the same "
                                 "expert slots", "[1, inf)")
    train_capacity_factor: float = setting(1.05, "expert slots per group in training: ceil(k·S·c/E) for S tokens, "
                                                 "rounded up to a multiple of 4", "(0, inf)")
    eval_capacity_factor: Optional[float] = setting(2.0, "the same factor in evaluation; null: dropless (every token "
                                                         "gets its expert)", "(0, inf)")
    batch_priority: bool = setting(True, "Batch Priority Routing: fill expert slots by gate value, highest first "
                                         "(false: by position)")
    router_noise: bool = setting(True, "add N(0, (1/E)²) noise to the router logits in training")
    backend: Literal["auto", "torch", "triton"] = setting("auto", "expert layer implementation; auto: Triton on "
                                                                  "CUDA, the PyTorch reference elsewhere")
    expert_init: Literal["shared", "independent"] = setting(
        "shared", "shared: every expert of a layer starts from the same draw (V-MoE's split_rngs = False; router noise "
                  "and Batch Priority Routing separate them); independent: each expert draws its own weights")

    def __post_init__(self):
        if self.top_k != 1:
            raise LimoeError("model.moe.top_k: only top-1 routing is implemented; set it to 1.")


def every_n_layers(depth: int, n: int = 2) -> tuple[int, ...]:
    """Blocks n-1, 2n-1, … (0-based): V-MoE's "every 2" puts experts in blocks 1, 3, 5, …"""
    return tuple(range(n - 1, depth, n))


def last_n_layers(depth: int, count: int, every: int = 2) -> tuple[int, ...]:
    """The last `count` of the every-`every` positions (V-MoE's "last N")."""
    positions = every_n_layers(depth, every)
    if count > len(positions):
        raise LimoeError(
            f"model.moe.layers: 'last {count}' asks for more MoE blocks than the {len(positions)} "
            f"'every {every}' positions of a depth-{depth} model."
        )
    return positions[len(positions) - count :]


def resolve_layer_spec(spec: Any, depth: int) -> Any:
    """Turn `every N` / `last N` into explicit indices; leave lists to the type check."""
    if not isinstance(spec, str):
        return spec
    words = spec.split()
    if len(words) == 2 and words[1].isdigit() and words[0] in ("every", "last"):
        number = int(words[1])
        if words[0] == "every" and number < 1:
            raise LimoeError(f"model.moe.layers: {spec!r} places no experts; write 'every N' with N ≥ 1.")
        return list(every_n_layers(depth, number) if words[0] == "every" else last_n_layers(depth, number))
    raise LimoeError(
        f"model.moe.layers: cannot read {spec!r}; write a list of block indices, 'every 2' or 'last 12'."
    )
