"""Write choice sets made from the held-out emoji, in the three layouts `limoe eval choice` reads.

Emoji names make hard negatives for free: the skin-tone variants of an emoji differ only in the
tone word of their names ("waving hand light skin tone" / "… dark skin tone"), and many people
emoji come as man and woman. From `heldout/` (emoji no model trained on the demo shards has seen):

- `sugar_crepe/`: clip_benchmark's SugarCrepe layout, images in `val2017/`:
  `replace_att.json`, each toned emoji's caption against the same emoji with another tone (its
  tone shifted two steps along light, medium-light, medium, medium-dark, dark), and
  `replace_obj.json`, each caption naming a man, woman, boy or girl against its swap.
- `winoground/`: the Winoground release's layout, `examples.jsonl` and `images/`: for every emoji
  with tones, its light and dark variants (images and captions), and its medium-light and
  medium-dark ones.
- `choice.jsonl` (images in `sugar_crepe/val2017/`): for every toned variant, the variant's image
  against the names of all its emoji's variants, and its name against all their images.

    python data_shards/build_choice_sets.py --output /tmp/emoji_choice    # ~1 s
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
TONED = re.compile(r"^(?P<base>.+) (?P<tone>medium-light|medium-dark|light|medium|dark) skin tone$")
PERSON_SWAPS = {"man": "woman", "woman": "man", "men": "women", "women": "men", "boy": "girl", "girl": "boy"}
PERSON = re.compile(r"\b(" + "|".join(PERSON_SWAPS) + r")\b")
WINOGROUND_PAIRS = (("light", "dark"), ("medium-light", "medium-dark"))


def read_pairs(shards: Path) -> dict[str, tuple[str, bytes]]:
    """key → (caption, JPEG bytes) of every sample in the shards, by key."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(shards.glob("*.tar*")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, extension = member.name.partition(".")
                members.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return {key: (files["txt"].decode("utf-8").strip(), files["jpg"]) for key, files in sorted(members.items())}


def shifted_tone(caption: str) -> str | None:
    """The caption with its skin tone two steps further along TONES, or None without a tone."""
    match = TONED.match(caption)
    if match is None:
        return None
    tone = TONES[(TONES.index(match["tone"]) + 2) % len(TONES)]
    return f"{match['base']} {tone} skin tone"


def swapped_person(caption: str) -> str | None:
    """The caption with man/woman, men/women and boy/girl swapped, or None without one."""
    swapped = PERSON.sub(lambda word: PERSON_SWAPS[word[1]], caption)
    return swapped if swapped != caption else None


def variants(pairs: dict[str, tuple[str, bytes]]) -> dict[str, dict[str, str]]:
    """base emoji name → {tone: key} for every emoji with skin tones ('' is the untoned one)."""
    by_caption = {caption: key for key, (caption, _) in pairs.items()}
    groups: dict[str, dict[str, str]] = {}
    for caption, key in by_caption.items():
        match = TONED.match(caption)
        if match is not None:
            groups.setdefault(match["base"], {})[match["tone"]] = key
    for base, group in groups.items():
        if base in by_caption:
            group[""] = by_caption[base]
    return dict(sorted(groups.items()))


def build(output: Path, shards: Path = HERE / "heldout") -> dict[str, int]:
    pairs = read_pairs(shards)
    images = output / "sugar_crepe" / "val2017"
    images.mkdir(parents=True, exist_ok=True)
    for key, (_, jpeg) in pairs.items():
        (images / f"{key}.jpg").write_bytes(jpeg)
    counts = {}
    for subset, negative in (("replace_att", shifted_tone), ("replace_obj", swapped_person)):
        items = {key: {"filename": f"{key}.jpg", "caption": caption, "negative_caption": negative(caption)}
                 for key, (caption, _) in pairs.items() if negative(caption) is not None}
        (output / "sugar_crepe" / f"{subset}.json").write_text(json.dumps(items, indent=1) + "\n")
        counts[subset] = len(items)

    groups = variants(pairs)
    winoground = output / "winoground"
    (winoground / "images").mkdir(parents=True, exist_ok=True)
    examples = []
    for base, group in groups.items():
        for first, second in WINOGROUND_PAIRS:
            if first in group and second in group:
                names = [f"{len(examples)}_img_{i}" for i in (0, 1)]
                for name, tone in zip(names, (first, second)):
                    (winoground / "images" / f"{name}.jpg").write_bytes(pairs[group[tone]][1])
                examples.append({"id": len(examples), "caption_0": pairs[group[first]][0],
                                 "caption_1": pairs[group[second]][0], "image_0": names[0], "image_1": names[1]})
    (winoground / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    counts["winoground"] = len(examples)

    lines = []
    for group in groups.values():
        keys = list(group.values())
        texts = [pairs[key][0] for key in keys]
        files = [f"sugar_crepe/val2017/{key}.jpg" for key in keys]
        for answer, key in enumerate(keys):
            lines.append({"images": [files[answer]], "texts": texts, "answer": answer})
            lines.append({"images": files, "texts": [texts[answer]], "answer": answer})
    (output / "choice.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    counts["jsonl"] = len(lines)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--shards", type=Path, default=HERE / "heldout")
    args = parser.parse_args()
    print(" ".join(f"{name}={count}" for name, count in build(args.output, args.shards).items()))


if __name__ == "__main__":
    main()
