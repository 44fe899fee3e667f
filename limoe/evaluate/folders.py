"""Image classification sets stored as folders: one sub-folder per class (torchvision's
ImageFolder layout), e.g. ImageNet's validation set arranged by synset (n01440764/…).

Labels are the class folders' indices in sorted order, as ImageFolder numbers them; for the
1000 ImageNet-1k synsets that is the standard label order, the order of open_clip's class names.
A class folder may be empty (its class just has no samples). Files that cannot be decoded are
skipped and counted instead of ending a 50,000-image run at image 49,000. Without a class-names
file the folders name their classes (`limoe.data.class_folders`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from limoe.data.class_folders import imagenet_synsets
from limoe.data.crops import Window, centre_window, uncropped_batch
from limoe.data.pipeline import BadSampleCounter, EvalBatch, WorkerTally
from limoe.errors import LimoeError
from limoe.data.preprocess import eval_transform
from limoe.data.images import UnusableImage, decode_rgb
from limoe.data.shards import IMAGE_SUFFIXES

IMAGENET_LAYOUT_HINT = (
    "zero-shot classification expects one folder per class; for ImageNet, the validation images sorted into the "
    "1000 synset folders (n01440764/ILSVRC2012_val_00000293.JPEG, …), which the standard valprep.sh "
    "(https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh, run inside the folder) "
    "creates, or webdataset shards with .cls labels"
)


@dataclass(frozen=True)
class ImageFolderSet:
    """A scanned class-folder tree: class folder names in label order and (file, label) pairs."""

    root: Path
    classes: list[str]
    files: list[tuple[Path, int]]

    @property
    def is_imagenet(self) -> bool:
        return tuple(self.classes) == imagenet_synsets()


def looks_like_image_folder(root: Path) -> bool:
    """Class sub-folders or loose images: what `scan_image_folder` reads or explains. An archive
    beside them (ILSVRC2012_img_val.tar, often left in val/) does not make it a shard folder."""
    return any(_is_class_folder(p) or p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())


def scan_image_folder(root: Path) -> ImageFolderSet:
    """The classes and image files under `root`; a folder of loose images gets the layout hint."""
    classes = sorted(folder.name for folder in _class_folders(root))
    if not classes:
        loose = any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())
        found = "holds images directly, not in class folders" if loose else "holds no class folders"
        raise LimoeError(f"{root} {found}; {IMAGENET_LAYOUT_HINT}.")
    files = [(path, label) for label, name in enumerate(classes) for path in _image_files(root / name)]
    if not files:
        raise LimoeError(f"the {len(classes)} class folders under {root} hold no image files; {IMAGENET_LAYOUT_HINT}.")
    return ImageFolderSet(root, classes, files)


def _is_class_folder(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")


def _class_folders(root: Path) -> Iterator[Path]:
    return (p for p in root.iterdir() if _is_class_folder(p))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ImageFiles(Dataset):
    """(key, image tensor or the reason it is unusable, label) per (file, label); the key is the
    file's path relative to `root`, or the whole path without one. `transform` may give a
    `Window` instead of a tensor, for a crop on the device."""

    def __init__(self, root: Optional[Path], files: list[tuple[Path, int]], transform: Callable):
        self.root = root
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, Union[torch.Tensor, Window, str], int]:
        """(key, image tensor, label), or (key, the reason it is skipped, label)."""
        path, label = self.files[index]
        key = (path if self.root is None else path.relative_to(self.root)).as_posix()
        try:
            return key, self.transform(decode_rgb(path)), label
        except UnusableImage as unusable:
            return key, unusable.args[0], label


def _collate(records: list, image_size: int) -> tuple[Optional[EvalBatch], list[tuple[str, str]], int]:
    """A batch of the decoded records (None if there are none), the others' (key, reason), the count read."""
    good = [r for r in records if not isinstance(r[1], str)]
    skipped = [(key, image) for key, image, _ in records if isinstance(image, str)]
    if not good:
        return None, skipped, len(records)
    keys, images, labels = zip(*good)
    if isinstance(images[0], Window):  # cropped on the device
        batch_images = uncropped_batch([w.pixels for w in images], image_size, [w.window for w in images])
    else:
        batch_images = torch.stack(images)
    batch = EvalBatch(batch_images, list(keys), None, torch.tensor(labels, dtype=torch.int64))
    return batch, skipped, len(records)


class ImageFolderLoader:
    """EvalBatch(images, keys, None, labels) over a class-folder tree, in file order.

    Skipped files are counted in `bad_samples` as the shard loaders count theirs (reasons
    'bad_image', 'image_too_large', 'image_aspect_ratio'), so reports read the same whichever
    layout the data came in. With `resize_on="device"` the images are `Uncropped`, as the shard
    loaders give them.
    """

    def __init__(self, dataset: ImageFolderSet, image_size: int, batch_size: int, workers: int,
                 resize_on: str = "worker"):
        self.root = dataset.root
        self.classes = dataset.classes
        transform = (functools.partial(centre_window, image_size=image_size) if resize_on == "device"
                     else eval_transform(image_size))
        self.loader = DataLoader(ImageFiles(dataset.root, dataset.files, transform), batch_size=batch_size,
                                 num_workers=workers, collate_fn=functools.partial(_collate, image_size=image_size))
        self.bad_samples = BadSampleCounter(max_bad_fraction=1.0, check_after=0)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[EvalBatch]:
        self.bad_samples.reset()
        tally = WorkerTally(worker=0)
        for batch, skipped, read in self.loader:
            tally.seen += read
            for key, reason in skipped:
                tally.skip(reason, str(self.root), key)
            self.bad_samples.update(tally.copy())
            if batch is not None:
                yield batch
