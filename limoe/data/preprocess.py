"""The model's view of raw inputs: image transforms and the tokenizer, one definition for all.

Training shards, evaluation folders and shards, clip_benchmark and the routing pictures all use
these, so a checkpoint always sees the tensors it was trained on: open_clip's transforms at the
config's resolution, normalised with the OpenAI CLIP mean and std (train: random resized crop;
eval: resize the shorter side, center crop), and open_clip's CLIP BPE tokenizer cut to the
config's context length (zero padded, end-of-text kept when truncating).

Batches are made of uint8 images (a quarter of the bytes of float32) and normalised by
`normalize`, with the arithmetic of open_clip's ToTensor + Normalize: training batches on the
device, evaluation batches in the worker. The training crop itself is in `limoe.data.crops`.
"""

from __future__ import annotations

import functools

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor
from torchvision.transforms import Compose, Normalize, ToTensor

MEAN = open_clip.OPENAI_DATASET_MEAN
STD = open_clip.OPENAI_DATASET_STD


def image_transform(image_size: int, train: bool) -> Compose:
    """PIL image → [3, image_size, image_size] float tensor."""
    return open_clip.image_transform(image_size, is_train=train, mean=MEAN, std=STD)


def eval_transform(image_size: int) -> Compose:
    return image_transform(image_size, train=False)


@functools.lru_cache(maxsize=None)
def eval_crop(image_size: int) -> Compose:
    """PIL image → PIL image: the eval transform's resize of the shorter side and centre crop,
    before the tensor conversion and normalisation (`normalize` does those on uint8 batches)."""
    return Compose([t for t in eval_transform(image_size).transforms if not isinstance(t, (ToTensor, Normalize))])


def normalize(images: Tensor) -> Tensor:
    """[..., 3, H, W] uint8 → float32 normalised, exactly as `image_transform` would have made it:
    images [B, 3, H, W], and video clips [B, T, 3, H, W] frame by frame."""
    mean = images.new_tensor(MEAN, dtype=torch.float32)[:, None, None]  # [3, 1, 1]
    std = images.new_tensor(STD, dtype=torch.float32)[:, None, None]
    return (images.float().div(255) - mean) / std


@functools.lru_cache(maxsize=None)
def tokenizer(context_length: int) -> SimpleTokenizer:
    """list of strings → [B, context_length] int64 token ids; built once per process and length."""
    return SimpleTokenizer(context_length=context_length)


def unnormalize(images: Tensor) -> Tensor:
    """[B, 3, H, W] as the transforms produce them → [B, 3, H, W] in [0, 1], for pictures."""
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    return (images.float().cpu() * std + mean).clamp(0, 1)
