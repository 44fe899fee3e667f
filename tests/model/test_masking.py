"""Masks: exact kept-patch counts, seeded and different per image, independent of how the batch is
split over ranks; BERT's 80/10/10 corruption at its rates, never touching padding or markers."""

import pytest
import torch

from limoe.model.masking import (
    IGNORE,
    BatchShard,
    corrupt_tokens,
    kept_patch_count,
    masked_patches,
    random_patch_keep,
    step_generator,
)


def _generator(seed: int = 0, step: int = 0) -> torch.Generator:
    return step_generator(seed, step, "test", torch.device("cpu"))


@pytest.mark.parametrize("patches, ratio, kept", [(64, 0.75, 16), (49, 0.5, 25), (196, 0.75, 49), (50, 0.15, 43),
                                                  (16, 0.5, 8), (7, 0.9, 1)])
def test_masking_keeps_exactly_round_n_times_one_minus_r_patches_per_image(patches, ratio, kept):
    assert kept_patch_count(patches, ratio) == kept  # worked by hand: 49·0.5 = 24.5 → 25, 50·0.85 = 42.5 → 43
    keep = random_patch_keep(32, patches, ratio, _generator())
    assert keep.shape == (32, kept)
    for row in keep:
        assert row.unique().numel() == kept and 0 <= row.min() and row.max() < patches
        assert torch.equal(row, row.sort().values)
    hidden = masked_patches(keep, patches)
    assert (hidden.sum(dim=1) == patches - kept).all()
    assert not hidden.gather(1, keep).any()


def test_masks_are_seeded_and_differ_across_images_and_steps():
    keep = random_patch_keep(16, 64, 0.75, _generator())
    assert torch.equal(keep, random_patch_keep(16, 64, 0.75, _generator()))  # a pure function of (seed, step)
    assert len({tuple(row.tolist()) for row in keep}) == 16  # every image its own subset
    assert not torch.equal(keep, random_patch_keep(16, 64, 0.75, _generator(step=1)))
    assert not torch.equal(keep, random_patch_keep(16, 64, 0.75, _generator(seed=1)))


def test_each_rank_draws_its_rows_of_the_global_batch():
    whole = random_patch_keep(8, 64, 0.5, _generator())
    tokens = torch.randint(1, 1000, (8, 16), generator=torch.Generator().manual_seed(0))
    corrupt = lambda batch, shard: corrupt_tokens(batch, batch > 0, 0.5, 0.8, 0.1, (1, 1000), _generator(), shard)
    full = corrupt(tokens, BatchShard())
    for rank in range(2):
        shard = BatchShard.for_rank(rank, 2, 4)
        rows = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(random_patch_keep(4, 64, 0.5, _generator(), shard), whole[rows])
        part = corrupt(tokens[rows], shard)
        assert torch.equal(part.tokens, full.tokens[rows]) and torch.equal(part.targets, full.targets[rows])
        assert torch.equal(part.at_mask, full.at_mask[rows])


def test_mlm_replacement_rates_are_bert_80_10_10_over_100k_tokens():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 49406, (64_000, 16), generator=generator)
    tokens[:, 0], tokens[:, 12] = 49406, 49407  # start and end markers, then padding
    tokens[:, 13:] = 0
    maskable = (tokens != 0) & (tokens < 49406)
    out = corrupt_tokens(tokens, maskable, 0.15, 0.8, 0.1, (1, 49406), _generator())
    predicted = out.targets != IGNORE
    count = int(predicted.sum())
    assert count > 100_000
    assert predicted.sum() / maskable.sum() == pytest.approx(0.15, abs=0.01)
    random = predicted & ~out.at_mask & (out.tokens != tokens)
    unchanged = predicted & ~out.at_mask & (out.tokens == tokens)
    assert out.at_mask.sum() / count == pytest.approx(0.8, abs=0.01)
    assert random.sum() / count == pytest.approx(0.1, abs=0.01)
    assert unchanged.sum() / count == pytest.approx(0.1, abs=0.01)
    assert torch.equal(out.targets[predicted], tokens[predicted])
    # Nothing outside the predicted tokens changes; padding and markers are never predicted.
    assert torch.equal(out.tokens[~predicted], tokens[~predicted]) and not out.at_mask[~predicted].any()
    assert not predicted[~maskable].any()
    assert out.tokens[random].min() >= 1 and out.tokens[random].max() < 49406
