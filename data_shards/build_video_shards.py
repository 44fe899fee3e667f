"""Rebuild the video demo shards: emoji sprites moving across a plain background.

Source and licence: the sprites are Noto Color Emoji glyphs drawn exactly as the image demo draws
them (`build_demo_shards.render`, imported: Debian's `fonts-noto-color-emoji` 2.042, Apache 2.0
artwork, SIL OFL font), their names from the `emoji` package (BSD). Nothing is downloaded.

    apt-get install fonts-noto-color-emoji
    pip install emoji==2.16.0 pillow==13.0.0       # with limoe installed (pip install -e .)
    python data_shards/build_video_shards.py [--font PATH]

What is drawn: each clip is 8 frames of 32×32 px stored as one filmstrip PNG (256×32, the frames
side by side; `limoe.data.video` reads it). One sprite, the glyph shrunk to 16×16, moves in a
straight line left, right, up or down, slowly (1 px a frame) or fast (2 px a frame), on a plain
background of one of a few colours; where it starts across the motion, and along it as far as
the path stays in the frame, is drawn from a generator seeded by the clip's key, so a rebuild is
byte for byte the same (PNG encoding is deterministic for one Pillow version; tar members and gzip
headers carry fixed times). Strips are palette PNGs of at most 32 colours, which keeps a clip
near 1 kB.

Captions say what is seen: "a cat face moving left, fast", in the `.json` `"text"` list of
LAION-CLAP's layout (one caption each). Held out: every sprite is never seen moving in one of
the four directions (sprite i: direction i mod 4), so `video_heldout/` — those combinations
only — asks for a direction on a sprite that training showed moving other ways. Its `.cls` is
the direction (0 left, 1 right, 2 up, 3 down; `classnames.txt`), for zero-shot direction
classification (chance 1/4) and for retrieval.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import emoji
from PIL import Image, ImageFont

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # build_demo_shards beside this file, also when imported from elsewhere
from build_demo_shards import FONT, FONT_SIZE, Glyph, caption, render  # noqa: E402

from limoe.data.shards import write_shards  # noqa: E402

SPRITES = ("cat_face", "dog_face", "fish", "frog", "turtle", "snail",  # emoji package names
           "red_apple", "rocket", "ghost", "automobile", "soccer_ball", "octopus")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy); class = index
SPEEDS = {"slow": 1, "fast": 2}  # pixels a frame
BACKGROUNDS = ((255, 255, 255), (226, 240, 250), (250, 236, 214), (222, 244, 222), (236, 230, 246))
FRAMES = 8
FRAME_SIZE = 32
SPRITE_SIZE = 16
COLOURS = 32  # of the palette PNG
CLIPS = {"video_train": 10, "video_heldout": 8}  # clips per (sprite, direction, speed)
SHARD_SIZE = {"video_train": 120, "video_heldout": 96}


@dataclass(frozen=True)
class Clip:
    sprite: int  # index into SPRITES
    direction: str
    speed: str
    number: int

    @property
    def key(self) -> str:
        return f"{SPRITES[self.sprite]}_{self.direction}_{self.speed}_{self.number}"

    @property
    def name(self) -> str:
        return caption(f":{SPRITES[self.sprite]}:", None)

    @property
    def caption(self) -> str:
        article = "an" if self.name[0] in "aeiou" else "a"
        return f"{article} {self.name} moving {self.direction}, {self.speed}"

    @property
    def held_out(self) -> bool:
        return list(DIRECTIONS).index(self.direction) == self.sprite % len(DIRECTIONS)


def clips(split: str) -> list[Clip]:
    held_out = split == "video_heldout"
    return [Clip(sprite, direction, speed, number)
            for sprite in range(len(SPRITES)) for direction in DIRECTIONS for speed in SPEEDS
            for number in range(CLIPS[split])
            if Clip(sprite, direction, speed, number).held_out == held_out]


def sprites(font_path: Path) -> list[Image.Image]:
    """Each sprite's glyph as the image demo renders it, shrunk to SPRITE_SIZE² RGBA."""
    font = ImageFont.truetype(str(font_path), FONT_SIZE)
    shrunk = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in SPRITES:
            path = Path(scratch) / f"{name}.png"
            render(Glyph(emoji.emojize(f":{name}:"), name, None), font, path)
            with Image.open(path) as glyph:
                shrunk.append(glyph.resize((SPRITE_SIZE, SPRITE_SIZE), Image.Resampling.LANCZOS))
    return shrunk


def filmstrip(clip: Clip, sprite: Image.Image) -> bytes:
    """The clip's frames side by side as a palette PNG; the path stays inside the frame."""
    draws = random.Random(clip.key)
    (dx, dy), step = DIRECTIONS[clip.direction], SPEEDS[clip.speed]
    room, travel = FRAME_SIZE - SPRITE_SIZE, (FRAMES - 1) * step
    along = draws.randint(0, room - travel)  # start along the motion, counted from where it begins
    across = draws.randint(0, room)
    background = draws.choice(BACKGROUNDS)
    strip = Image.new("RGB", (FRAMES * FRAME_SIZE, FRAME_SIZE), background)
    for frame in range(FRAMES):
        position = along + frame * step
        moving = position if (dx or dy) > 0 else room - position
        x, y = (moving, across) if dx else (across, moving)
        strip.paste(sprite, (frame * FRAME_SIZE + x, y), sprite)
    encoded = io.BytesIO()
    strip.quantize(COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        encoded, format="PNG", optimize=True)
    return encoded.getvalue()


def samples(split: str, drawn: list[Image.Image]) -> list[dict]:
    out = []
    for clip in clips(split):
        meta = {"text": [clip.caption], "sprite": clip.name, "direction": clip.direction, "speed": clip.speed}
        sample = {"__key__": clip.key, "png": filmstrip(clip, drawn[clip.sprite]), "json": json.dumps(meta).encode()}
        if split == "video_heldout":
            sample["cls"] = str(list(DIRECTIONS).index(clip.direction)).encode()
        out.append(sample)
    return out


def templates() -> str:
    """The held-out set's zero-shot prompts, one per sprite and speed (`a cat face {}, fast`): a class
    name (`moving left`) fills in the caption's motion, so a class's prompts average over the sprites and
    speeds and differ only in the direction."""
    return "".join(Clip(sprite, "{}", speed, 0).caption.replace("moving {}", "{}") + "\n"
                   for sprite in range(len(SPRITES)) for speed in SPEEDS)


def build(output: Path, font_path: Path) -> dict[str, int]:
    drawn = sprites(font_path)
    counts = {}
    for split in CLIPS:
        target = output / split
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        split_samples = samples(split, drawn)
        write_shards(split_samples, target / "%05d.tar", SHARD_SIZE[split], compress=True)
        if split == "video_heldout":
            (target / "classnames.txt").write_text("".join(f"moving {d}\n" for d in DIRECTIONS))
            (target / "templates.txt").write_text(templates())
        counts[split] = len(split_samples)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--font", type=Path, default=FONT, help="NotoColorEmoji.ttf (fonts-noto-color-emoji)")
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args()
    for split, count in build(args.output, args.font).items():
        print(f"{split}: {count} clips")


if __name__ == "__main__":
    main()
