"""Choice sets on disk: SugarCrepe, Winoground and JSONL items of candidate images and texts.

Every item becomes a `ChoiceItem`: its candidate images and texts and the (image, text) pairs
that belong together. Three layouts are read:

- `sugar_crepe`, clip_benchmark's local layout: `<subset>.json` files mapping an id to
  `{"filename", "caption", "negative_caption"}`, images in `val2017/` beside them (COCO val2017,
  where clip_benchmark keeps them) or, without that folder, beside the JSON files. One image, two
  texts; the caption matches.
- `winoground`, the layout of the facebook/winoground release: `examples.jsonl` (`caption_0`,
  `caption_1`, `image_0`, `image_1` per line) and the image files in `images/`, named by
  `image_0`/`image_1` with or without their extension. Two images, two texts; 0 goes with 0 and 1
  with 1.
- `jsonl`: one item per line, `{"images": [...], "texts": [...], "answer": i}`, image paths
  relative to the file's folder, any number of candidates on either side. A side with one entry
  is the query; on a side with several entries `answer` is the index of the right one. So one
  image and several texts asks which text describes the image; several images and one text asks
  which image the text describes; with several of both, images[answer] and texts[answer] are the
  pair that belongs together and both questions are asked.

An image a data file names must lie inside its folder (the file's, or the layout's image folder)
after `..` and symbolic links are followed; one that leaves it is refused, naming the item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from limoe.errors import LimoeError
from limoe.files import read_text_file

FORMATS = ("sugar_crepe", "winoground", "jsonl")
SUGAR_CREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
SUGAR_CREPE_IMAGES = "val2017"
WINOGROUND_IMAGE_SUFFIXES = ("", ".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ChoiceItem:
    images: tuple[Path, ...]
    texts: tuple[str, ...]
    matches: tuple[tuple[int, int], ...]  # (image index, text index) pairs that belong together


def read_choice_sets(data: Path, format: str, subsets: Optional[Sequence[str]] = None) -> dict[str, list[ChoiceItem]]:
    """The items of `data` in `format`, by set name: one set per SugarCrepe subset, else one set
    named after the format."""
    data = Path(data)
    if subsets and format != "sugar_crepe":
        raise LimoeError(f"--subsets names SugarCrepe's annotation files; drop it for --format {format}.")
    if format == "sugar_crepe":
        return read_sugar_crepe(data, subsets)
    if format == "winoground":
        return {"winoground": read_winoground(data)}
    if format == "jsonl":
        return {"jsonl": read_jsonl(data)}
    raise LimoeError(f"--format {format!r}: choose one of {', '.join(FORMATS)}.")


def read_sugar_crepe(root: Path, subsets: Optional[Sequence[str]]) -> dict[str, list[ChoiceItem]]:
    """`<subset>.json` files under `root`: the given subsets, or every SugarCrepe subset present."""
    _require_folder(root, "SugarCrepe")
    if not subsets:
        subsets = [name for name in SUGAR_CREPE_SUBSETS if (root / f"{name}.json").is_file()]
        if not subsets:
            raise LimoeError(
                f"{root} holds none of SugarCrepe's annotation files ({', '.join(f'{s}.json' for s in SUGAR_CREPE_SUBSETS)}); "
                f"give --subsets NAME for other NAME.json files."
            )
    images = root / SUGAR_CREPE_IMAGES if (root / SUGAR_CREPE_IMAGES).is_dir() else root
    return {subset: _sugar_crepe_items(root / f"{subset}.json", images) for subset in subsets}


def _sugar_crepe_items(path: Path, images: Path) -> list[ChoiceItem]:
    annotations = _load_json(path)
    if not isinstance(annotations, dict) or not annotations:
        raise LimoeError(f"{path} is not a non-empty JSON object of items; SugarCrepe files map an id to "
                         f'{{"filename", "caption", "negative_caption"}}.')
    items = []
    for key, item in annotations.items():
        fields = _strings(item, ("filename", "caption", "negative_caption"), f"{path}: item {key}")
        image = _existing_image(_inside(images, fields["filename"], f"{path}: item {key}"), f"{path}: item {key}")
        items.append(ChoiceItem((image,), (fields["caption"], fields["negative_caption"]), ((0, 0),)))
    return items


def read_winoground(root: Path) -> list[ChoiceItem]:
    """`examples.jsonl` and `images/` under `root`."""
    _require_folder(root, "Winoground")
    path = root / "examples.jsonl"
    items = []
    for line_number, example in _jsonl_lines(path):
        where = f"{path} line {line_number}"
        fields = _strings(example, ("caption_0", "caption_1", "image_0", "image_1"), where)
        images = tuple(_winoground_image(root / "images", fields[f"image_{i}"], where) for i in (0, 1))
        items.append(ChoiceItem(images, (fields["caption_0"], fields["caption_1"]), ((0, 0), (1, 1))))
    return items


def _winoground_image(folder: Path, name: str, where: str) -> Path:
    for suffix in WINOGROUND_IMAGE_SUFFIXES:
        if _inside(folder, f"{name}{suffix}", where).is_file():
            return folder / f"{name}{suffix}"
    raise LimoeError(f"{where}: no image {name} (.png, .jpg, …) in {folder}; unpack the release's images.zip there.")


def read_jsonl(path: Path) -> list[ChoiceItem]:
    """One `{"images": [...], "texts": [...], "answer": i}` item per line (see the module docstring)."""
    items = []
    for line_number, item in _jsonl_lines(path):
        where = f"{path} line {line_number}"
        images = _string_list(item, "images", where)
        texts = _string_list(item, "texts", where)
        answer = item.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise LimoeError(f'{where}: "answer" must be the index of the right candidate, an integer.')
        if len(images) == len(texts) == 1:
            raise LimoeError(f"{where}: one image and one text leave nothing to choose; give several on one side.")
        for side, candidates in (("images", images), ("texts", texts)):
            if len(candidates) > 1 and not 0 <= answer < len(candidates):
                raise LimoeError(f'{where}: "answer" {answer} is out of range for its {len(candidates)} {side}; '
                                 f"indices start at 0.")
        pair = (answer if len(images) > 1 else 0, answer if len(texts) > 1 else 0)
        files = tuple(_existing_image(_inside(path.parent, image, where), where) for image in images)
        items.append(ChoiceItem(files, tuple(texts), (pair,)))
    return items


# ---------------------------------------------------------------------------------------------
# Checks with one-line errors


def _require_folder(root: Path, name: str) -> None:
    if not root.is_dir():
        raise LimoeError(f"{root} is not a folder; --data for {name} is the folder holding its annotations and images.")


def _load_json(path: Path):
    if not path.is_file():
        raise LimoeError(f"{path} does not exist; check --data and --subsets.")
    try:
        return json.loads(read_text_file(path, "annotation file"))
    except json.JSONDecodeError as error:
        raise LimoeError(f"{path} is not valid JSON ({error}).") from None


def _jsonl_lines(path: Path):
    """(line number, object) for every non-empty line; an empty file is an error."""
    if not path.is_file():
        raise LimoeError(f"{path} does not exist; check --data.")
    lines = [(n, line) for n, line in enumerate(read_text_file(path, "choice file").split("\n"), 1) if line.strip()]
    if not lines:
        raise LimoeError(f"{path} holds no items; write one JSON object per line.")
    for number, line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise LimoeError(f"{path} line {number} is not valid JSON ({error}).") from None
        if not isinstance(value, dict):
            raise LimoeError(f"{path} line {number} is not a JSON object.")
        yield number, value


def _strings(item, names: Sequence[str], where: str) -> dict[str, str]:
    if not isinstance(item, dict):
        raise LimoeError(f"{where} is not a JSON object with {', '.join(names)}.")
    for name in names:
        if not isinstance(item.get(name), str) or not item[name]:
            raise LimoeError(f'{where} has no "{name}"; each item needs {", ".join(names)} (non-empty strings).')
    return {name: item[name] for name in names}


def _string_list(item: dict, name: str, where: str) -> list[str]:
    values = item.get(name)
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise LimoeError(f'{where}: "{name}" must be a non-empty list of strings.')
    return values


def _inside(folder: Path, name: str, where: str) -> Path:
    """`folder / name` for an image a data file names, which must stay inside `folder` once `..`
    and symbolic links are followed: a set's items never reach the rest of the disk (an absolute
    path, `../`, or a link out is refused before anything is opened)."""
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise LimoeError(f"{where}: image {name!r} lies outside {folder}; image paths must stay inside the set's "
                         f"image folder.")
    return path


def _existing_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise LimoeError(f"{where}: image {path} does not exist; check the images folder.")
    return path
