"""The model's view of raw inputs at evaluation: the eval image transform and the tokenizer.

Both are the ones the shard pipeline (`limoe.data`) applies, built from the checkpoint's config:
open_clip's eval transform (resize the shorter side to `image_size`, center crop, normalise with
the OpenAI CLIP mean and std) and open_clip's CLIP BPE tokenizer cut to `context_length`, so
folders, shards and clip_benchmark all feed a checkpoint the same tensors.
"""

from __future__ import annotations

import open_clip
from open_clip.tokenizer import SimpleTokenizer
from torchvision.transforms import Compose


def eval_transform(image_size: int) -> Compose:
    """PIL image → [3, image_size, image_size] float tensor."""
    return open_clip.image_transform(
        image_size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )


def tokenizer(context_length: int) -> SimpleTokenizer:
    """list of strings → [B, context_length] int64 token ids, zero padded, truncated with EOT kept."""
    return SimpleTokenizer(context_length=context_length)
