"""Masked inputs: random subsets of image patches (MAE, FLIP) and BERT's caption-token corruption.

Every draw comes from a generator seeded by (seed, step, purpose) and is made for the *global*
batch, of which each rank takes its own rows (`BatchShard`). So the masks are a pure function of
the step (a resumed run draws the ones an uninterrupted run would have) and do not depend on how
many processes share the batch: one process and eight draw the same masks for the same examples.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from limoe.distributed import rank_and_world

IGNORE = -100  # target of a token that is not predicted (cross_entropy's ignore_index)


@dataclass(frozen=True)
class BatchShard:
    """This rank's rows [start, start + local batch) of a global batch of `global_size` examples."""

    start: int = 0
    global_size: int = 0  # 0: the local batch is the whole batch

    @classmethod
    def for_rank(cls, rank: int, world_size: int, local_batch: int) -> "BatchShard":
        return cls(rank * local_batch, world_size * local_batch)

    def rows(self, draw: Tensor, local_batch: int) -> Tensor:
        """This rank's rows of a draw made for the global batch."""
        return draw[self.start : self.start + local_batch]

    def global_shape(self, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (max(self.global_size, self.start + local_shape[0]), *local_shape[1:])


def step_generator(seed: int, step: int, purpose: str, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from (seed, step, purpose) alone: the same on every rank."""
    digest = hashlib.blake2b(f"{seed}/{step}/{purpose}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def _uniform(shape: tuple[int, ...], shard: BatchShard, generator: torch.Generator) -> Tensor:
    """U[0, 1) of `shape` [B_local, ...]: this rank's rows of a draw for the global batch."""
    return shard.rows(torch.rand(shard.global_shape(shape), generator=generator, device=generator.device), shape[0])


def kept_patch_count(num_patches: int, mask_ratio: float) -> int:
    """round(N·(1 − r)) patches stay visible (halves round up), at least one."""
    return max(1, math.floor(num_patches * (1 - mask_ratio) + 0.5))


def random_patch_keep(batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator,
                      shard: BatchShard = BatchShard()) -> Tensor:
    """Indices of each image's visible patches [B, K], ascending; a fresh random subset per image.

    MAE's recipe: rank the patches by uniform noise and keep the K lowest, so every subset of
    size K is equally likely and the count is exact, not a Bernoulli draw per patch.
    """
    keep = kept_patch_count(num_patches, mask_ratio)
    noise = _uniform((batch, num_patches), shard, generator)  # [B, N]
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # [B, K]


def patch_keep_at(step: int, seed: int, purpose: str, images: Tensor, num_patches: int, mask_ratio: float) -> Tensor:
    """This rank's share of the kept patches [B, K] that `step` draws for its global batch (`purpose`
    keeps the draws of different uses apart); images [B, 3, H, W] or clips [B, T] give the batch and
    device."""
    shard = BatchShard.for_rank(*rank_and_world(), images.shape[0])
    generator = step_generator(seed, step, purpose, images.device)
    return random_patch_keep(images.shape[0], num_patches, mask_ratio, generator, shard)


def tube_keep(spatial_keep: Tensor, steps: int, grid_patches: int) -> Tensor:
    """VideoMAE's tube masking: spatial_keep [B, K] patches of one frame grid (of `grid_patches`) →
    the kept tubelets [B, steps · K], the same grid positions at every tubelet step (time-major token
    indices, ascending), so a hidden patch cannot be copied from its neighbour in time."""
    offsets = torch.arange(steps, device=spatial_keep.device) * grid_patches  # [steps]
    return (offsets[None, :, None] + spatial_keep[:, None, :]).flatten(1)  # [B, steps · K]


def tube_keep_at(step: int, seed: int, purpose: str, inputs: Tensor, grid_patches: int, steps: int,
                 mask_ratio: float) -> Tensor:
    """`patch_keep_at` for inputs whose tokens are `steps` repetitions of one grid of `grid_patches`
    (video's tubelet steps): the grid's kept patches, kept alike at every step (`tube_keep`) [B,
    steps · K]; with one step, the kept patches themselves [B, K]."""
    keep = patch_keep_at(step, seed, purpose, inputs, grid_patches, mask_ratio)
    return keep if steps == 1 else tube_keep(keep, steps, grid_patches)


def masked_patches(keep: Tensor, num_patches: int) -> Tensor:
    """keep [B, K] visible indices → [B, N] bool, True where the patch is hidden."""
    hidden = torch.ones(keep.shape[0], num_patches, dtype=torch.bool, device=keep.device)
    return hidden.scatter(1, keep, False)


@dataclass
class CorruptedTokens:
    """A caption batch after BERT's corruption, and what the model must predict."""

    tokens: Tensor  # [B, L] input ids: random replacements applied; other positions keep their id
    at_mask: Tensor  # [B, L] bool: the input here is the learned mask embedding instead of the id's
    targets: Tensor  # [B, L] the original id where a prediction is due, IGNORE elsewhere


def corrupt_tokens(tokens: Tensor, maskable: Tensor, mask_ratio: float, replace_with_mask: float,
                   replace_with_random: float, random_ids: tuple[int, int], generator: torch.Generator,
                   shard: BatchShard = BatchShard()) -> CorruptedTokens:
    """BERT's masked-language-modelling input. tokens, maskable [B, L] → CorruptedTokens.

    Each `maskable` token (not padding, not a start/end marker) is predicted with probability
    `mask_ratio`; of those, a share `replace_with_mask` is shown as the mask embedding, a share
    `replace_with_random` as a uniform random id from `random_ids` [low, high), and the rest
    unchanged, so the model cannot tell from the input which tokens it will be asked about.
    """
    predicted = (_uniform(tokens.shape, shard, generator) < mask_ratio) & maskable  # [B, L]
    how = _uniform(tokens.shape, shard, generator)  # [B, L]
    at_mask = predicted & (how < replace_with_mask)
    at_random = predicted & (how >= replace_with_mask) & (how < replace_with_mask + replace_with_random)
    random_tokens = torch.randint(*random_ids, shard.global_shape(tokens.shape), generator=generator,
                                  device=generator.device)
    random_tokens = shard.rows(random_tokens, tokens.shape[0])  # [B, L]
    return CorruptedTokens(
        tokens=torch.where(at_random, random_tokens, tokens),
        at_mask=at_mask,
        targets=torch.where(predicted, tokens, IGNORE),
    )
