"""Zero-shot classification: classify images (or audio or video clips) by their nearest class embedding.

Each class's embedding is the mean of its prompt embeddings (one per template), renormalised
(open_clip's `build_zero_shot_classifier`, the CLIP paper's protocol), or, with classes given by
exemplar images (Uni-Perceiver's handwritten-digit example), the mean of its exemplars'
normalised image embeddings, renormalised. An image's predicted classes are those whose
embeddings are most cosine-similar to its own; a prompt-tuned model (`limoe tune`) adds its
learned linear term to the scaled cosines.

Audio clips (`modality="audio"`) come from audio shards with `.cls` labels, in the first or
third layout, and take the 'sounds' templates by default; video clips (`modality="video"`) from
video shards alike, with the 'videos' templates ("a video of something {c}.") by default.

The data may come in three layouts, recognised in this order:
  - a clip_benchmark webdataset folder (`test/0.tar …`, `test/nshards.txt`, `classnames.txt`),
  - a class-folder tree (ImageNet val by synset, or any ImageFolder tree with a class-names file),
  - webdataset shards with `.cls` labels (a folder of .tar/.tar.gz files, a glob or a brace
    pattern), class names from `classnames.txt` beside them when present, else ImageNet-1k's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import Tensor
from tqdm import tqdm

from limoe.config import ModelConfig
from limoe.data.class_folders import class_folder_names
from limoe.data.pipeline import EvalBatch, ShardLoader, eval_loader, expand_shards
from limoe.data.preprocess import tokenizer
from limoe.errors import LimoeError, warn
from limoe.evaluate.folders import ImageFolderLoader, ImageFolderSet, looks_like_image_folder, scan_image_folder
from limoe.evaluate.inputs import (check_modality, check_placement, check_still_frame, counted_as, encode_inputs,
                                   eval_inputs, labelled_set_needs)
from limoe.data.pipeline import loader_options
from limoe.evaluate.metrics import classification_metrics
from limoe.evaluate.runtime import check_report_output, inference, load_for_eval, nothing_read, report
from limoe.evaluate.turns import encode_in_turns
from limoe.model.prompts import classification_logits, label_head
from limoe.model.tower import Limoe
from limoe.prompt_templates import Template, load_classnames, load_templates, read_lines

PROMPTS_PER_FORWARD = 800  # prompts encoded in one batch: 10 classes of the 80 OpenAI templates


def zeroshot_classifier(model: Limoe, classnames: Sequence[str], templates: Sequence[Template],
                        progress: bool = False, shared: bool = False) -> Tensor:
    """Class embeddings [D, C]: each class's prompt embeddings averaged, then L2-normalised, by
    open_clip's builder, a forward's worth of classes at a time. `shared`: the processes of a run
    take turns encoding those forwards (`limoe.evaluate.turns`)."""
    per_forward = max(1, PROMPTS_PER_FORWARD // len(templates))
    chunks = [classnames[start : start + per_forward] for start in range(0, len(classnames), per_forward)]
    with inference(model) as device:
        def encode(names: Sequence[str]) -> tuple[Tensor]:
            classifier = build_zero_shot_classifier(model, tokenizer(model.config.context_length), names, templates,
                                                    num_classes_per_batch=per_forward, device=device, use_tqdm=False)
            return (classifier.float().T.contiguous(),)  # [c, D]

        chunks_read = tqdm(chunks, desc="classes", unit="forward", disable=not progress)
        classes = [encoded for _, (encoded,) in encode_in_turns(chunks_read, encode, len, shared)]
    return torch.cat(classes).T  # [D, C]


def encode_labelled_images(model: Limoe, batches: Iterable[EvalBatch], progress: bool = False,
                           shared: bool = False, modality: str = "image",
                           still_frame: bool = False) -> tuple[Tensor, Tensor]:
    """Image (or `modality`'s) features [N, D] and labels [N] of every sample in `batches`, on the
    CPU. `shared`: every process of the run reads the same batches and they take turns encoding
    them (`limoe.evaluate.turns`). `still_frame`: video clips as their centre frame repeated."""
    features, labels = [], []
    with inference(model) as device:
        def encode(batch: EvalBatch) -> tuple[Tensor]:
            return (encode_inputs(model, modality, eval_inputs(batch.images, device, still_frame)),)  # [B, D]

        batches_read = tqdm(batches, desc=counted_as(modality), unit="batch", disable=not progress)
        for batch, (encoded,) in encode_in_turns(batches_read, encode, lambda batch: len(batch.images), shared):
            features.append(encoded.cpu())
            labels.append(batch.labels)
    if not labels:
        raise nothing_read(batches, f"zero-shot classification needs {labelled_set_needs(modality)}")
    return torch.cat(features), torch.cat(labels)


def open_classification_set(data: str, classnames: Union[None, Path, Sequence[str]], config: ModelConfig,
                            batch_size: int, workers: int, resize_on: str = "worker", decode_on: str = "worker",
                            modality: str = "image") -> tuple[Union[ImageFolderLoader, ShardLoader], list[str]]:
    """A loader of labelled EvalBatches for `data` in any supported layout, and its class names.
    `resize_on`: where the images are resized and centre-cropped: the data workers or the device;
    `decode_on`: where shards' images are decoded (class folders are decoded in the workers).
    `modality`: "audio" or "video" reads audio or video shards (class-folder trees are image sets).

    `classnames` is a names file, None (the data's own or ImageNet-1k's), or the class list itself
    (exemplar folders' names): then a class-folder tree must have exactly those folders.
    """
    path = Path(data)
    if path.is_dir() and (path / "test" / "nshards.txt").is_file():
        count = int((path / "test" / "nshards.txt").read_text().strip())
        spec, beside = f"{path}/test/{{0..{count - 1}}}.tar", path / "classnames.txt"
    elif path.is_dir() and looks_like_image_folder(path):
        if modality != "image":
            raise LimoeError(f"{path} is a class-folder tree, which is read as images; for {modality}, build shards from "
                             f"it with `limoe shards build --{modality} {path} --classification --output DIR` and "
                             f"give DIR.")
        if decode_on == "device":
            raise LimoeError(f"{path} is a class-folder tree, whose images are decoded in the data workers; drop "
                             f"--decode-on device, or build shards from it with `limoe shards build --classification`.")
        folder = scan_image_folder(path)
        loader = ImageFolderLoader(folder, config.image_size, batch_size, workers, resize_on)
        return loader, _folder_classnames(folder, classnames)
    else:
        spec = data
        beside = Path(expand_shards(spec)[0]).parent / "classnames.txt"
    if classnames is None and beside.is_file():
        classnames = beside
    loader = eval_loader(spec, batch_size, config.image_size, config.context_length, workers, classification=True,
                         max_bad_fraction=1.0, rank=0, world_size=1, resize_on=resize_on, decode_on=decode_on,
                         **loader_options(config, modality))
    return loader, list(classnames) if isinstance(classnames, (list, tuple)) else load_classnames(classnames)


def _folder_classnames(folder: ImageFolderSet, path: Union[None, Path, Sequence[str]]) -> list[str]:
    """The class-names file's names, one per class folder; without one, the folders' own names
    (`class_folder_names`), said in a line unless they are the 1000 ImageNet-1k synsets."""
    if isinstance(path, (list, tuple)):
        if list(path) != folder.classes:
            raise LimoeError(
                f"the class folders of {folder.root} ({', '.join(folder.classes[:3])}, …) are not the exemplar folders "
                f"({', '.join(path[:3])}, …); give both the same class folder names."
            )
        return list(path)
    if path is None:
        names, source = class_folder_names(folder.classes, folder.root)
        if names is None:
            raise LimoeError(f"{source}; give --classnames with one name per folder, in sorted folder order.")
        if not folder.is_imagenet:  # the standard set needs no note
            warn(f"{source}; give --classnames to name them otherwise.")
        return names
    names = read_lines(path, "class names")
    if len(names) != len(folder.classes):
        raise LimoeError(
            f"{path} has {len(names)} class names but {folder.root} has {len(folder.classes)} class folders; "
            f"give one name per folder, in sorted folder order."
        )
    return names


def exemplar_classifier(model: Limoe, folder: ImageFolderSet, batch_size: int = 64, workers: int = 2,
                        progress: bool = False) -> Tensor:
    """Class embeddings [D, C] from exemplar images, one folder per class: each class's normalised
    image embeddings averaged, then L2-normalised, as prompt embeddings are averaged over templates."""
    loader = ImageFolderLoader(folder, model.config.image_size, batch_size, workers)
    features, labels = encode_labelled_images(model, loader, progress)  # [N, D], [N]
    counts = torch.bincount(labels, minlength=len(folder.classes))  # [C]
    if (counts == 0).any():
        empty = folder.classes[int((counts == 0).nonzero()[0])]
        raise LimoeError(f"class folder {folder.root / empty} has no readable exemplar image; give every class at least one.")
    sums = torch.zeros(len(folder.classes), features.shape[1]).index_add_(0, labels, features)  # [C, D]
    return F.normalize(sums / counts[:, None], dim=-1).T


def evaluate_zeroshot(model: Limoe, data: str, classnames: Optional[Path] = None, templates: Optional[str] = None,
                      batch_size: int = 64, workers: int = 2, progress: bool = False,
                      candidate_images: Optional[Path] = None, shared: bool = False, resize_on: str = "worker",
                      decode_on: str = "worker", modality: str = "image", still_frame: bool = False) -> dict:
    """Zero-shot top-1, top-5 and mean per-class recall of `model` on `data` (any layout above);
    with `modality="audio"` (`"video"`), of its audio (video) clips on shards of them with `.cls` labels.

    Classes are given by name, as prompts from `templates` ('openai' (default), 'simple' or a
    file), or by exemplar images: `candidate_images` is a folder with one sub-folder of images
    per class, whose sorted order is the label order. A prompt-tuned model adds its linear term
    and must be given the label set it was tuned for; its templates are the default. Returns the
    metrics plus the numbers of samples and classes and the skipped samples by reason. `shared`:
    every process of a run calls this together and they take turns encoding images and prompts.
    `resize_on`, `decode_on`: where the images are resized and centre-cropped, and decoded
    (`data.resize_on`, `data.decode_on`; images only). Default templates: 'openai' for images,
    'sounds' for audio, 'videos' for video. `still_frame`: each video clip read as its centre frame
    repeated (`limoe.evaluate.inputs.still_frames`), the single-frame baseline.
    """
    check_modality(model, modality)
    check_placement(modality, resize_on, decode_on)
    check_still_frame(modality, still_frame)
    head = label_head(model)
    if modality != "image" and candidate_images is not None:
        raise LimoeError(f"--candidate-images gives the classes by example images; drop it to classify {modality} "
                         f"by class names.")
    if head is not None and head.modality != modality:
        raise LimoeError(f"this checkpoint was prompt-tuned on {counted_as(head.modality)} (its linear term reads "
                         f"{head.modality} embeddings); classify {counted_as(modality)} with its base model, or give "
                         f"--modality {head.modality}.")
    if candidate_images is not None:  # input errors first, before any encoding
        if classnames is not None or templates is not None:
            raise LimoeError("--candidate-images gives the classes by example; drop --classnames and --templates.")
        if head is not None:
            raise LimoeError("this checkpoint was prompt-tuned on class names; use its base model with --candidate-images.")
        exemplars = scan_image_folder(Path(candidate_images))
        classes: Union[None, Path, list[str]] = exemplars.classes
    else:
        prompts = list(head.templates) if head is not None and templates is None else load_templates(templates, modality)
        classes = classnames
    loader, names = open_classification_set(data, classes, model.config, batch_size, workers, resize_on, decode_on,
                                            modality)
    if head is not None and tuple(names) != head.classnames:
        raise LimoeError(
            f"the checkpoint was prompt-tuned for {len(head.classnames)} classes ({', '.join(head.classnames[:3])}, …), "
            f"not the {len(names)} class names of {data} ({', '.join(names[:3])}, …); evaluate it on its own label set."
        )
    features, labels = encode_labelled_images(model, loader, progress, shared, modality, still_frame)  # first: bad data fails fast
    if labels.max() >= len(names):
        raise LimoeError(
            f"{data} has labels up to {labels.max().item()} but only {len(names)} class names; "
            f"give the set's class names with --classnames."
        )
    if candidate_images is not None:
        classifier = exemplar_classifier(model, exemplars, batch_size, workers, progress)  # [D, C]
    else:
        classifier = zeroshot_classifier(model, names, prompts, progress, shared)  # [D, C]
    logits = classification_logits(model, features, classifier)  # [N, C]
    return {**classification_metrics(logits, labels), "samples": len(labels), "classes": len(names),
            "skipped": loader.bad_samples.bad}


def run_zeroshot(checkpoint: Path, data: str, classnames: Optional[str], templates: Optional[str],
                 output: Optional[str], batch_size: int, capacity_factor: Optional[str], device: str,
                 workers: int, candidate_images: Optional[str] = None, resize_on: str = "worker",
                 decode_on: str = "worker", modality: str = "image", still_frame: bool = False) -> dict:
    """`limoe eval zeroshot`: load the checkpoint, evaluate, print and optionally save the metrics."""
    check_report_output(output, checkpoint, data, classnames, templates, candidate_images)
    check_placement(modality, resize_on, decode_on)
    check_still_frame(modality, still_frame)
    model = load_for_eval(checkpoint, device, capacity_factor)
    metrics = evaluate_zeroshot(model, data, Path(classnames) if classnames else None, templates, batch_size,
                                workers, progress=True,
                                candidate_images=Path(candidate_images) if candidate_images else None,
                                resize_on=resize_on, decode_on=decode_on, modality=modality, still_frame=still_frame)
    report(f"zero-shot classification of {checkpoint} on {data}", metrics, output)
    return metrics
