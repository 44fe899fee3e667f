"""Image-text (audio-text, video-text) retrieval on caption shards: recall@1/5/10 from images (clips) to
texts and back.

Several captions per image are supported the way `limoe shards build` stores them: one sample
per (image, caption) pair, the image repeated. Samples whose images are identical after the eval
transform are one image with several captions: each image is encoded once, a text→image hit is
its own image among the nearest, and an image→text hit is any of its captions among the nearest.
With one caption per image (data_shards/heldout) this is plain paired retrieval. Audio and
video clips (`modality="audio"`, `"video"`) are grouped the same way, by their decoded samples.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor
from tqdm import tqdm

from limoe.data.crops import Uncropped
from limoe.data.pipeline import EvalBatch, eval_loader
from limoe.evaluate.inputs import (check_modality, check_placement, check_still_frame, counted_as, encode_inputs,
                                   eval_inputs)
from limoe.data.pipeline import loader_options
from limoe.evaluate.metrics import retrieval_metrics
from limoe.evaluate.runtime import check_report_output, inference, load_for_eval, nothing_read, report
from limoe.evaluate.turns import encode_in_turns
from limoe.model.tower import Limoe


def _digest(*tensors: Tensor) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(tensor.numpy().tobytes())
    return digest.digest()


def _digests(images: Union[Tensor, Uncropped]) -> list[bytes]:
    """A content digest per image: of the crop the worker made or, for images the device crops,
    of the decoded pixels (or the encoded file) and the centre window it will crop from them."""
    if isinstance(images, Uncropped) and images.encoded is not None:
        return [_digest(torch.frombuffer(bytearray(file), dtype=torch.uint8), window)
                for file, window in zip(images.encoded.files, images.windows)]
    if isinstance(images, Uncropped):
        return [_digest(pixels[:height, :width], window)
                for pixels, (height, width), window in zip(images.pixels, images.sizes.tolist(), images.windows)]
    return [_digest(image) for image in images]


def encode_pairs(model: Limoe, batches: Iterable[EvalBatch], progress: bool = False,
                 shared: bool = False, modality: str = "image",
                 still_frame: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Features of the distinct images (or clips) [N, D] and of every caption [M, D], and
    text_to_image [M].

    `batches` are CPU EvalBatches with tokens (one caption per sample), of `modality`. `shared`: every process
    of the run reads the same batches and they take turns encoding them (`limoe.evaluate.turns`);
    batches are dealt out where they hold equally many new images, so that every process runs
    the same forwards. `still_frame`: video clips as their centre frame repeated (which clips are
    distinct, and which captions are theirs, still decided by the real clips).
    """
    rows: dict[bytes, int] = {}  # image content digest → row of the image features

    def with_new_images(batches_read: Iterable[EvalBatch]) -> Iterator[tuple[EvalBatch, list[int], Tensor]]:
        """Each batch, the positions of its images not seen before, and each sample's image row [B]."""
        for batch in batches_read:
            digests = _digests(batch.images)
            new = []
            for i, digest in enumerate(digests):
                if digest not in rows:
                    rows[digest] = len(rows)
                    new.append(i)
            yield batch, new, torch.tensor([rows[digest] for digest in digests])

    images, texts, owners = [], [], []
    with inference(model) as device:
        def encode(job: tuple[EvalBatch, list[int], Tensor]) -> tuple[Tensor, Tensor]:
            batch, new, _ = job
            text = model.encode_text(batch.tokens.to(device)).float()  # [B, D]
            if not new:
                return text.new_zeros((0, text.shape[1])), text
            inputs = eval_inputs(batch.images, device, still_frame)[new]
            return encode_inputs(model, modality, inputs), text  # [new, D], [B, D]

        jobs = with_new_images(tqdm(batches, desc="pairs", unit="batch", disable=not progress))
        for (_, _, owner), (image, text) in encode_in_turns(jobs, encode, lambda job: (len(job[1]), len(job[2])), shared):
            images.append(image.cpu())
            texts.append(text.cpu())
            owners.append(owner)
    if not texts:
        raise nothing_read(batches, f"retrieval needs shards of {counted_as(modality)} with captions")
    return torch.cat(images), torch.cat(texts), torch.cat(owners)


def evaluate_retrieval(model: Limoe, data: Union[str, Iterable[EvalBatch]], batch_size: int = 64, workers: int = 2,
                       progress: bool = False, shared: bool = False, resize_on: str = "worker",
                       decode_on: str = "worker", modality: str = "image", still_frame: bool = False) -> dict:
    """Recall@1/5/10 image→text and text→image of `model` (in any mode; restored afterwards);
    with `modality="audio"` (`"video"`), audio→text and text→audio on audio shards (video on video shards).

    `data`: a shard spec (folder, glob, brace pattern) read once in full on every rank, so all
    ranks step the model together and get the same numbers; or any iterable of EvalBatches with
    tokens. Returns the recalls plus the numbers of images and texts, and skipped samples when
    the loader counts them. `shared`: every process of a run calls this together and they take
    turns encoding. `resize_on`, `decode_on`: where a shard spec's images are resized and
    centre-cropped, and decoded (`data.resize_on`, `data.decode_on`: the data workers, or the
    model's device; images only). `still_frame`: each video clip read as its centre frame repeated.
    """
    check_modality(model, modality)
    check_placement(modality, resize_on, decode_on)
    check_still_frame(modality, still_frame)
    config = model.config
    loader = data if not isinstance(data, str) else eval_loader(
        data, batch_size, config.image_size, config.context_length, workers, max_bad_fraction=1.0, rank=0, world_size=1,
        resize_on=resize_on, decode_on=decode_on, **loader_options(config, modality),
    )
    features, text_features, text_to_item = encode_pairs(model, loader, progress, shared, modality, still_frame)
    metrics = {**retrieval_metrics(features, text_features, text_to_item, modality),
               counted_as(modality): len(features), "texts": len(text_features)}
    if hasattr(loader, "bad_samples"):
        metrics["skipped"] = loader.bad_samples.bad
    return metrics


def run_retrieval(checkpoint: Path, data: str, output: Optional[str], batch_size: int, capacity_factor: Optional[str],
                  device: str, workers: int, resize_on: str = "worker", decode_on: str = "worker",
                  modality: str = "image", still_frame: bool = False) -> dict:
    """`limoe eval retrieval`: load the checkpoint, evaluate, print and optionally save the metrics."""
    check_report_output(output, checkpoint, data)
    check_placement(modality, resize_on, decode_on)
    check_still_frame(modality, still_frame)
    model = load_for_eval(checkpoint, device, capacity_factor)
    metrics = evaluate_retrieval(model, data, batch_size, workers, progress=True, resize_on=resize_on,
                                 decode_on=decode_on, modality=modality, still_frame=still_frame)
    report(f"{modality}-text retrieval of {checkpoint} on {data}", metrics, output)
    return metrics
