"""Writing webdataset shards in the layout img2dataset produces, or LAION-CLAP's for audio.

Training reads tar shards because they stream: one sequential read per shard instead of one
random read per image, which is what keeps GPUs fed from network or spinning storage. The layout
is img2dataset's (`00000.tar`, `00001.tar`, …, each sample stored as `KEY.jpg`, `KEY.txt` and a
`KEY.json` sidecar with the sample's origin) so that shards downloaded with img2dataset and shards
built here load the same way. Classification sets (an ImageFolder tree, `class/xxx.jpg`) become
`KEY.cls` labels plus a `classnames.txt` beside the shards, labels numbered in sorted folder
order as torchvision's ImageFolder does (so ImageNet synset folders get the standard indices);
the names are the ones zero-shot evaluation gives the folders (`class_folder_names`: ImageNet-1k's
for synset folders, else the folder names with underscores as spaces), since they become prompts;
folders named like synsets that are not ImageNet-1k's keep their names.

`layout="clip_benchmark"` writes a classification set the way clip_benchmark's `wds/` datasets
are stored instead: `test/0.tar … test/N-1.tar`, `test/nshards.txt`, and beside `test/` the
`classnames.txt` and a `zeroshot_classification_templates.txt` (the CLIP paper's 80, `{c}` for the
class name), which clip_benchmark needs for zero-shot classification. `limoe eval zeroshot` reads
that layout too.

Every image is decoded and re-encoded as RGB JPEG: this checks it is readable before it reaches a
training run, applies EXIF rotation, flattens transparency onto white and, with `image_size`,
resizes the shorter side to `image_size` and center-crops a square (img2dataset's `center_crop`
mode). The eval transform does exactly that crop, so eval sees what was stored; training loses
only the margins its random crops would rarely reach, and the shards shrink to what is used.

Audio (`modality="audio"`) is stored as LAION-CLAP's audio shards store it: `KEY.flac` (or `.wav`,
`.ogg`, `.opus`, `.mp3`: the file's bytes as they are, under its own extension) and a `KEY.json`
whose `"text"` lists every caption of the file, one of which training draws per step. Clips are
not re-encoded — decoding, cropping and resampling to the model's rate happen when they are read,
and a lossy file re-encoded would lose more — but each file's header is read, so files that are
not audio or hold no frames are counted at build time instead of during training.

Video (`modality="video"`) is stored the same way: `KEY.mp4`, `KEY.webm` or a filmstrip `KEY.png` /
`KEY.jpg` (square frames side by side, `limoe.data.video`) as it is, and a `KEY.json` listing its
captions; each file's frames are counted (a video file's packets, with PyAV; a filmstrip's header),
and files without a frame are counted as unreadable.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import soundfile
import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from limoe.data.audio import AUDIO_EXTENSIONS
from limoe.data.class_folders import class_folder_names
from limoe.data.images import to_rgb
from limoe.data.video import VIDEO_EXTENSIONS, UnusableVideo, count_frames
from limoe.errors import LimoeError, warn
from limoe.files import read_text_file, refuse_overwriting_inputs
from limoe.prompt_templates import load_templates

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = tuple(f".{extension}" for extension in AUDIO_EXTENSIONS)
VIDEO_SUFFIXES = tuple(f".{extension}" for extension in VIDEO_EXTENSIONS)
INPUTS = {"image": (IMAGE_SUFFIXES, "images"), "audio": (AUDIO_SUFFIXES, "audio"),
          "video": (VIDEO_SUFFIXES, "videos")}  # suffixes, plural in counts
OPTIONS = {"image": "--images", "audio": "--audio", "video": "--video"}  # the command's option for each
FILE_COLUMNS = ("file", "filename", "image", "filepath")  # filepath, title: open_clip's CsvDataset defaults
CAPTION_COLUMNS = ("caption", "text", "title")
JPEG_QUALITY = 90
SHARD_MTIME = 0  # fixed member times so that the same input gives byte-identical shards
LAYOUTS = ("img2dataset", "clip_benchmark")
CLIP_BENCHMARK_SPLIT = "test"  # the split clip_benchmark evaluates by default


@dataclass(frozen=True)
class _Entry:
    """An input file and either one of its captions or its class index."""

    path: Path
    caption: Optional[str] = None
    label: Optional[int] = None


def build_shards(
    folder: Path,
    captions: Optional[Path],
    output: Path,
    image_size: Optional[int] = None,
    maxcount: int = 1000,
    classification: bool = False,
    compress: bool = False,
    layout: str = "img2dataset",
    progress: bool = False,
    modality: str = "image",
) -> dict:
    """Write `output/00000.tar`, … from a folder of images (or with `modality="audio"` of audio
    files) and a captions file, or from class folders; with `layout="clip_benchmark"`, an image
    classification set as `output/test/0.tar`, … (see above).

    `compress` writes gzip-compressed `.tar.gz` shards, which webdataset reads transparently; it
    pays off for small images, where tar's 512-byte headers and padding outweigh the JPEG bytes.
    Returns counts: `samples` and `shards` written and `unreadable_images` (`unreadable_audio`)
    skipped; with captions also `uncaptioned_images` (`uncaptioned_audio`), `captions_without_image`
    (`captions_without_audio`) and `empty_captions`; with classes `classes`. An image gives one
    sample per caption, an audio file one sample listing them all.
    `progress` shows on stderr how many samples have been read (see `_with_progress`).
    """
    folder, output = Path(folder), Path(output)
    clip_benchmark = layout == "clip_benchmark"
    _check_arguments(folder, captions, output, image_size, maxcount, classification, compress, layout, modality)
    suffixes, plural = INPUTS[modality]
    counts = {"samples": 0, "shards": 0, f"unreadable_{plural}": 0}
    if classification:
        classnames, entries = _class_folder_entries(folder, suffixes)
        counts["classes"] = len(classnames)
    else:
        entries = _captioned_entries(folder, Path(captions), counts, modality)
    entries = _with_progress(entries) if progress else entries
    if modality != "image":
        samples = _stored_samples(entries, folder, counts, modality)
    else:
        samples = _encoded_samples(entries, folder, image_size, counts)
    first = next(samples, None)
    if first is None:
        raise LimoeError(f"none of the {modality} files under {folder} could be read; check that they are "
                         f"{', '.join(suffix[1:] for suffix in suffixes)} files.")
    shards = output / CLIP_BENCHMARK_SPLIT if clip_benchmark else output
    shards.mkdir(parents=True, exist_ok=True)
    pattern = "%d.tar" if clip_benchmark else "%05d.tar"  # clip_benchmark reads test/{0..N-1}.tar
    counts["shards"] = write_shards(itertools.chain([first], samples), shards / pattern, maxcount, compress)
    if classification:
        (output / "classnames.txt").write_text("".join(f"{name}\n" for name in classnames), encoding="utf-8")
    if clip_benchmark:
        (shards / "nshards.txt").write_text(f"{counts['shards']}\n")
        templates = "".join(f"{template('{c}')}\n" for template in load_templates("openai"))
        (output / "zeroshot_classification_templates.txt").write_text(templates, encoding="utf-8")
    return counts


def _check_arguments(folder, captions, output, image_size, maxcount, classification, compress, layout,
                     modality) -> None:
    if layout not in LAYOUTS:
        raise LimoeError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}.")
    if modality not in INPUTS:
        raise LimoeError(f"modality {modality!r}: shards hold images, audio or video; use 'image', 'audio' or 'video'.")
    if modality != "image" and layout != "img2dataset":
        raise LimoeError(f"--layout clip_benchmark holds images; drop --layout for {modality} shards.")
    if modality != "image" and image_size is not None:
        raise LimoeError(f"--image-size resizes images, and {modality} is stored as it is; drop --image-size.")
    if layout == "clip_benchmark" and not classification:
        raise LimoeError("--layout clip_benchmark writes a classification set; add --classification (class folders).")
    if layout == "clip_benchmark" and compress:
        raise LimoeError("clip_benchmark reads uncompressed test/N.tar shards only; drop compression.")
    if not folder.is_dir():
        raise LimoeError(f"{modality} folder {folder} does not exist; check the {OPTIONS[modality]} path.")
    if classification and captions is not None:
        raise LimoeError("--captions is not used with --classification (labels come from the class folders); drop one.")
    if not classification and captions is None:
        raise LimoeError("no captions given; pass --captions FILE (CSV or JSONL), or --classification for class folders.")
    if captions is not None and not Path(captions).is_file():
        raise LimoeError(f"captions file {captions} does not exist; check the --captions path.")
    if (image_size is not None and image_size < 1) or maxcount < 1:
        raise LimoeError("--image-size and --maxcount must be positive integers.")
    refuse_overwriting_inputs({"--output": output}, [folder, captions])
    if any(output.glob("*.tar")) or any(output.glob("*.tar.gz")) or any(output.glob(f"{CLIP_BENCHMARK_SPLIT}/*.tar")):
        raise LimoeError(f"output folder {output} already holds shards; remove them or choose another folder.")


# ---------------------------------------------------------------------------------------------
# What to write


def _input_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `folder` with one of `suffixes`, recursively, in a fixed order (sorted relative paths)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def _class_folder_entries(root: Path, suffixes: tuple[str, ...]) -> tuple[list[str], list[_Entry]]:
    """The class names (see the module docstring) and one entry per file, labelled by folder."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    entries = [_Entry(path, label=label) for label, name in enumerate(folders)
               for path in _input_files(root / name, suffixes)]
    if not entries:
        raise LimoeError(f"{root} has no class folders with {', '.join(suffixes)} files; --classification expects "
                         f"{root}/CLASS/FILE{suffixes[0]}.")
    classnames, source = class_folder_names(folders, root)
    warn(f"{source}; classnames.txt holds {'the folder names' if classnames is None else 'them'}: edit it to name "
         f"the classes otherwise.")
    return classnames or folders, entries


def _captioned_entries(root: Path, captions: Path, counts: dict, modality: str) -> list[_Entry]:
    """Pair captions with image or audio files; one entry per (file, caption) pair, so COCO-style
    files with several captions per file work. Names match by path relative to `root`, else by
    file name."""
    suffixes, plural = INPUTS[modality]
    files = _input_files(root, suffixes)
    if not files:
        raise LimoeError(f"no {modality} files under {root}; expected {', '.join(suffixes)} files.")
    find = _file_finder(root, files)
    entries, unmatched, empty = [], 0, 0
    for name, caption in _read_captions(captions):
        path = find(name)
        if path is None:
            unmatched += 1
        elif not caption.strip():
            empty += 1
        else:
            entries.append(_Entry(path, caption=caption.strip()))
    if not entries:
        raise LimoeError(
            f"no caption in {captions} names a file under {root}; the file column must hold paths relative "
            f"to the folder or bare file names."
        )
    captioned = {entry.path for entry in entries}
    counts.update({f"captions_without_{modality}": unmatched, "empty_captions": empty,
                   f"uncaptioned_{plural}": sum(p not in captioned for p in files)})
    return sorted(entries, key=lambda entry: entry.path)


def _file_finder(root: Path, files: list[Path]):
    """name → file path: by path relative to `root`, else by a file name that is unique."""
    by_relative = {p.relative_to(root).as_posix(): p for p in files}
    by_name = {}
    for path in files:
        by_name.setdefault(path.name, []).append(path)

    def find(name: str) -> Optional[Path]:
        if Path(name).is_absolute() and Path(name).is_relative_to(root.resolve()):  # open_clip CSVs hold full paths
            name = Path(name).relative_to(root.resolve()).as_posix()
        if name in by_relative:
            return by_relative[name]
        matches = by_name.get(Path(name).name, [])
        if len(matches) > 1:
            raise LimoeError(
                f"caption file name {name!r} matches {len(matches)} files under {root}; "
                f"write it as a path relative to the folder."
            )
        return matches[0] if matches else None

    return find


def _read_captions(path: Path) -> Iterator[tuple[str, str]]:
    """(file name, caption) rows from a CSV or TSV with a header row, or from JSON lines with the
    same keys. A `.csv` whose header holds a tab is tab-separated: open_clip's CsvDataset reads
    `.csv` files with `sep="\\t"` by default, so its users' files often are."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise LimoeError(f"captions file {path} must be .csv, .tsv or .jsonl; convert it to one of those.")
    text = read_text_file(path, "captions file")
    if suffix in (".csv", ".tsv"):
        tabs = suffix == ".tsv" or "\t" in text.partition("\n")[0]
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if tabs else ",")
        file_key, caption_key = _caption_columns(reader.fieldnames or [], path)
        for row in reader:
            yield row[file_key] or "", row[caption_key] or ""
    else:
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                row = _json_row(line, path, number)
                file_key, caption_key = _caption_columns(list(row), path)
                yield str(row[file_key]), str(row[caption_key] or "")


def _json_row(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict):
        raise LimoeError(f"line {number} of {path} is not a JSON object; write one {{\"file\": …, \"caption\": …}} per line.")
    return row


def _caption_columns(columns: list[str], path: Path) -> tuple[str, str]:
    file_key = next((c for c in FILE_COLUMNS if c in columns), None)
    caption_key = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if file_key is None or caption_key is None:
        raise LimoeError(
            f"captions file {path} has columns {columns}; it needs one of {list(FILE_COLUMNS)} "
            f"and one of {list(CAPTION_COLUMNS)}."
        )
    return file_key, caption_key


# ---------------------------------------------------------------------------------------------
# Encoding and writing


def _with_progress(entries: list[_Entry]) -> Iterator[_Entry]:
    """`entries` one by one, showing on stderr how many have been read: a tqdm bar on a terminal, as
    training and evaluation show theirs; elsewhere (a log file, a batch job) a line at each tenth,
    which tqdm's redrawn bar would turn into one long line of carriage returns."""
    if sys.stderr.isatty():
        yield from tqdm(entries, desc="samples", unit="sample", dynamic_ncols=True)
        return
    tenth = -(-len(entries) // 10)
    for read, entry in enumerate(entries, 1):
        yield entry
        if read % tenth == 0 or read == len(entries):
            print(f"shards build: read {read} of {len(entries)} samples", file=sys.stderr, flush=True)


def _encoded_samples(entries: Iterable[_Entry], root: Path, image_size: Optional[int], counts: dict) -> Iterator[dict]:
    """webdataset sample dicts with keys 000000000, 000000001, … (img2dataset style); images that
    cannot be decoded are counted in `counts` and left out."""
    keys = (f"{index:09d}" for index in itertools.count())
    for path, group in itertools.groupby(entries, key=lambda entry: entry.path):
        try:
            jpeg, size, original = _encode_image(path, image_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            counts["unreadable_images"] += 1
            continue
        for entry in group:
            key = next(keys)
            meta = {"key": key, "file": path.relative_to(root).as_posix(), "width": size[0], "height": size[1],
                    "original_width": original[0], "original_height": original[1]}
            sample = {"__key__": key, "jpg": jpeg}
            if entry.label is None:
                sample["txt"] = entry.caption
                meta["caption"] = entry.caption
            else:
                sample["cls"] = entry.label
                meta["label"] = entry.label
            sample["json"] = meta
            counts["samples"] += 1
            yield sample


def _stored_samples(entries: Iterable[_Entry], root: Path, counts: dict, modality: str) -> Iterator[dict]:
    """LAION-CLAP-style sample dicts with keys 000000000, …: one per audio or video file, its bytes
    as they are and a `.json` listing its captions (`"text"`) or a `.cls` label; files whose header
    does not read as audio or video with frames are counted in `counts` and left out."""
    keys = (f"{index:09d}" for index in itertools.count())
    describe = _describe_audio if modality == "audio" else _describe_video
    for path, group in itertools.groupby(entries, key=lambda entry: entry.path):
        group = list(group)
        data = path.read_bytes()
        described = describe(data)
        if described is None:
            counts[f"unreadable_{INPUTS[modality][1]}"] += 1
            continue
        key = next(keys)
        meta = {"key": key, "file": path.relative_to(root).as_posix(), **described}
        sample = {"__key__": key, path.suffix[1:].lower(): data}
        if group[0].label is None:
            meta["text"] = [entry.caption for entry in group]
        else:
            sample["cls"] = meta["label"] = group[0].label
        sample["json"] = meta
        counts["samples"] += 1
        yield sample


def _describe_audio(data: bytes) -> Optional[dict]:
    """What the `.json` says of an audio file, or None when its header does not read as audio with frames."""
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception:  # libsndfile reports malformed input through several error types
        return None
    if info.frames <= 0:
        return None
    return {"sample_rate": info.samplerate, "channels": info.channels, "frames": info.frames}


def _describe_video(data: bytes) -> Optional[dict]:
    """What the `.json` says of a video file or filmstrip, or None when it has no frame to read."""
    try:
        frames, width, height = count_frames(data)
    except UnusableVideo:
        return None
    return {"frames": frames, "width": width, "height": height}


def _encode_image(path: Path, image_size: Optional[int]) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """JPEG bytes of the image as RGB (optionally shorter side resized and center-cropped),
    with the stored and the original (width, height)."""
    with Image.open(path) as image:
        original = image.size
        if image_size is not None:
            image.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale, still ≥ the target
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        if image_size is not None:
            image = ImageOps.fit(image, (image_size, image_size), method=Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue(), image.size, original


def write_shards(samples: Iterable[dict], pattern: Path, maxcount: int, compress: bool) -> int:
    """Write `samples` (webdataset dicts: `__key__` and one entry per member) into shards named by the
    %-pattern `pattern`, byte-reproducibly; returns how many."""
    finished = []

    def finish(name: str) -> None:
        finished.append(_gzip_in_place(name) if compress else name)

    with wds.ShardWriter(str(pattern), maxcount=maxcount, verbose=0, mtime=SHARD_MTIME, post=finish) as writer:
        for sample in samples:
            writer.write(sample)
    return len(finished)


def _gzip_in_place(name: str) -> str:
    """Compress a finished shard to NAME.gz with a fixed header time, so builds are reproducible."""
    target = f"{name}.gz"
    with open(name, "rb") as source, open(target, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as packed:
            shutil.copyfileobj(source, packed)
    Path(name).unlink()
    return target
