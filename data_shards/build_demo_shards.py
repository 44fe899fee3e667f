"""Rebuild the demo shards in this folder: Noto Color Emoji glyphs captioned with their names.

Emoji make a small image-text set that is real (designed pictures with standard names), freely
licensed and reproducible from Debian packages, so the whole pipeline can be exercised without
downloading a dataset. See README.md here for the licenses, counts and the exact command.

What is drawn: every fully-qualified emoji (and the skin-tone and hair components) of the `emoji`
package up to Emoji 15.1, the version Noto Color Emoji 2.042 implements, that the font draws as a
single glyph; later emoji fall back to placeholder glyphs. Captions are the package's English
names with underscores as spaces ("red apple", "waving hand medium skin tone"); country and
subdivision flags become "flag of NAME" because the package names them by place alone.

Held out: about 10% of base emoji, chosen by a hash of the emoji with skin tones removed, so all
skin-tone variants of an emoji fall on the same side and the split survives new emoji versions.
`heldout_cls` holds the held-out emoji whose Unicode 15.0 sub-group (emoji-test.txt, Debian
package `unicode-data`) is known, labelled by that sub-group; Emoji 15.1 additions have none there.
`train_cls` labels training emoji the same way, keeping only the sub-groups that no held-out emoji
has: its images and its classes are both disjoint from `heldout_cls`, so classifying the held-out
set stays zero-shot for a model co-trained on it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import emoji
from PIL import Image, ImageDraw, ImageFont

from limoe.data.shards import build_shards

HERE = Path(__file__).resolve().parent
FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT_SIZE = 109  # the one size at which the font's colour bitmaps (136x128) are stored
CANVAS = 136
IMAGE_SIZE = 64
NEWEST_EMOJI_VERSION = 15.1
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
VARIATION_SELECTOR = "\ufe0f"
FLAG_SUBGROUPS = ("country-flag", "subdivision-flag")
HELDOUT_PERCENT = 10
SHARD_SIZES = {"train": 500, "heldout": 200, "heldout_cls": 200, "train_cls": 200}


@dataclass(frozen=True)
class Glyph:
    text: str
    caption: str
    subgroup: str | None

    @property
    def file_name(self) -> str:
        return "-".join(f"{ord(c):x}" for c in self.text) + ".png"

    @property
    def heldout(self) -> bool:
        base = "".join(c for c in self.text if c not in SKIN_TONES and c != VARIATION_SELECTOR) or self.text
        return int.from_bytes(hashlib.sha256(base.encode()).digest()[:8], "big") % 100 < HELDOUT_PERCENT


def read_subgroups(path: Path) -> dict[str, str]:
    """emoji → sub-group name, from the `# subgroup:` headings of emoji-test.txt."""
    subgroups, current = {}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# subgroup:"):
            current = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            codes = line.split(";", 1)[0].split()
            subgroups["".join(chr(int(code, 16)) for code in codes)] = current
    return subgroups


def caption(name: str, subgroup: str | None) -> str:
    words = name.strip(":").replace("_", " ")
    return f"flag of {words}" if subgroup in FLAG_SUBGROUPS else words


def drawable_glyphs(font: ImageFont.FreeTypeFont, subgroups: dict[str, str]) -> list[Glyph]:
    """The emoji the font draws as exactly one non-empty glyph, in code point order."""
    advance = font.getlength("\U0001F600")
    glyphs = []
    for text, data in emoji.EMOJI_DATA.items():
        if data["status"] > emoji.STATUS["fully_qualified"] or data["E"] > NEWEST_EMOJI_VERSION:
            continue
        left, top, right, bottom = font.getbbox(text)
        if abs(font.getlength(text) - advance) < 1 and bottom > top:
            subgroup = subgroups.get(text)
            glyphs.append(Glyph(text, caption(data["en"], subgroup), subgroup))
    return sorted(glyphs, key=lambda glyph: glyph.file_name)


def render(glyph: Glyph, font: ImageFont.FreeTypeFont, path: Path) -> None:
    """The glyph centred on a transparent square canvas (the shard builder puts it on white)."""
    image = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((0, (CANVAS - 128) // 2), glyph.text, font=font, embedded_color=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_captions(glyphs: list[Glyph], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "caption"])
        writer.writerows([glyph.file_name, glyph.caption] for glyph in glyphs)


def build(output: Path, font_path: Path, emoji_test: Path) -> dict[str, dict]:
    font = ImageFont.truetype(str(font_path), FONT_SIZE)
    glyphs = drawable_glyphs(font, read_subgroups(emoji_test))
    splits = {
        "train": [g for g in glyphs if not g.heldout],
        "heldout": [g for g in glyphs if g.heldout],
    }
    counts = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name, members in splits.items():
            for glyph in members:
                render(glyph, font, scratch / name / glyph.file_name)
            write_captions(members, scratch / f"{name}.csv")
            counts[name] = _rebuild(scratch / name, scratch / f"{name}.csv", output / name, SHARD_SIZES[name], False)
        heldout_classes = {glyph.subgroup for glyph in splits["heldout"]} - {None}
        labelled = {
            "heldout_cls": [g for g in splits["heldout"] if g.subgroup is not None],
            "train_cls": [g for g in splits["train"] if g.subgroup is not None and g.subgroup not in heldout_classes],
        }
        for name, members in labelled.items():
            for glyph in members:
                render(glyph, font, scratch / name / glyph.subgroup / glyph.file_name)
            counts[name] = _rebuild(scratch / name, None, output / name, SHARD_SIZES[name], True)
    return counts


def _rebuild(images: Path, captions: Path | None, target: Path, maxcount: int, classification: bool) -> dict:
    shutil.rmtree(target, ignore_errors=True)
    return build_shards(images, captions, target, image_size=IMAGE_SIZE, maxcount=maxcount,
                        classification=classification, compress=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE)
    parser.add_argument("--font", type=Path, default=FONT, help="NotoColorEmoji.ttf (fonts-noto-color-emoji)")
    parser.add_argument("--emoji-test", type=Path, default=EMOJI_TEST, help="emoji-test.txt (unicode-data)")
    args = parser.parse_args()
    for split, counts in build(args.output, args.font, args.emoji_test).items():
        print(split, " ".join(f"{key}={value}" for key, value in counts.items()))


if __name__ == "__main__":
    main()
