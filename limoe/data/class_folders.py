"""The class names a tree of class folders (torchvision's ImageFolder layout) gives its classes
when no class-names file is given: ImageNet-1k synset folders (all 1000, or any subset such as
Imagenette's) get open_clip's names for their synsets, readable folder names (`golden_retriever`)
become the names with underscores as spaces. `limoe shards build --classification` writes these
names beside the shards and `limoe eval zeroshot` prompts with them, so both agree. The lists come
from timm and open_clip, imported on use: they are slow to import and only classification sets
need them.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence


@lru_cache(maxsize=None)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids in label order (timm ships the list; open_clip needs timm)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


SYNSET = re.compile(r"n\d{8}")  # an ImageNet (WordNet) synset id: n01440764


def class_folder_names(classes: Sequence[str], root: Path) -> tuple[Optional[list[str]], str]:
    """Class names for the class folders `classes` (sorted) of `root` when no names file is
    given, and where they came from: open_clip's ImageNet-1k names for synset folders, else the
    folder names with underscores as spaces. Folders named like synsets that are not all
    ImageNet-1k's have no names to take (None), and the line says so."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # slow to import: `limoe shards build` needs it here only

    index = {synset: label for label, synset in enumerate(imagenet_synsets())}
    if all(name in index for name in classes):
        names = [IMAGENET_CLASSNAMES[index[name]] for name in classes]
        return names, f"the class names of {root}'s {len(classes)} synset folders are ImageNet-1k's ({_first(names)})"
    if any(SYNSET.fullmatch(name) for name in classes):
        return None, f"{root} has {len(classes)} class folders named like ImageNet synsets that are not all ImageNet-1k's"
    names = [name.replace("_", " ") for name in classes]
    return names, (f"the class names of {root} are its {len(classes)} folder names with underscores as spaces "
                   f"({_first(names)})")


def _first(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
