"""Rebuild the audio demo shards: General MIDI instruments rendered from a public-domain soundfont.

Source and licence: `sf_GMbank.sf2` from Debian's `csound-soundfont` package (128 General MIDI
programs; its copyright file: "The file has Public Domain in its license field"), rendered with
`tinysoundfont` (MIT); program names and their 16 families from `pretty_midi` (MIT). Nothing is
downloaded: the soundfont comes from the Debian archive, the two libraries from PyPI.

    apt-get install csound-soundfont              # or: apt-get download csound-soundfont && dpkg -x ...
    pip install soundfile pretty_midi
    pip install --no-deps tinysoundfont           # its metadata asks for pyaudio, which rendering does not use
    python data_shards/build_audio_shards.py [--soundfont PATH]

What is rendered: each melodic program (bank 0, programs 0–127) plays short phrases — one long
note, two notes, three short notes, a rising or a falling arpeggio — in a low, middle or high
register, soft or loud, one second at 16 kHz, mono. A program's clips are distinct combinations of
phrase, register and loudness, drawn from a generator seeded by the program, so a rebuild is byte for byte
the same (tinysoundfont renders deterministically from a fresh synthesizer; FLAC encoding is
deterministic; tar members and gzip headers carry fixed times).

Captions say what can be heard: "three short loud notes on a violin, strings, high", with a second,
shorter one ("violin, strings") in the same `"text"` list (LAION-CLAP's layout: training draws one).
Held out: two programs of each family, chosen by a hash of their names, are never in training;
`audio_heldout/` holds two clips of each, captioned, and labelled by family in `KEY.cls`
(`classnames.txt`: the 16 families), for retrieval and zero-shot classification of instruments the
model never heard, from families it did.

Samples are stored as 8-bit FLAC to keep the shipped data small (about 6 kB a clip). So that quiet
programs do not drown in the quantisation noise, each clip is scaled to a fixed peak: 0.9 of full
scale when loud, 0.3 when soft — the loudness in the caption is what is heard.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pretty_midi
import soundfile
import tinysoundfont

from limoe.data.shards import write_shards

HERE = Path(__file__).resolve().parent
SOUNDFONT = Path("/usr/share/sounds/sf2/sf_GMbank.sf2")
RATE = 16_000  # samples per second
SECONDS = 1.0
HELD_OUT_PER_FAMILY = 2
CLIPS = {"train": 3, "heldout": 2}  # clips per program
SHARD_SIZE = 100
REGISTERS = {"low": 48, "middle": 60, "high": 72}  # MIDI note of the phrase's root
LOUDNESS = {"soft": 50, "loud": 110}  # MIDI velocity
PEAK = {"soft": 0.3, "loud": 0.9}  # of full scale, after rendering
# (caption with the loudness to fill in, semitones above the root of each note)
PHRASES = (
    ("one long {} note", (0,)),
    ("two {} notes", (0, 0)),
    ("three short {} notes", (0, 0, 0)),
    ("a {} rising arpeggio", (0, 4, 7)),
    ("a {} falling arpeggio", (7, 4, 0)),
)
SOUNDING = 0.8  # share of each note's slot for which the key is held; the rest is its release


@dataclass(frozen=True)
class Instrument:
    program: int
    name: str  # "violin", "lead 1 square"
    family: str  # "strings", "synth lead"

    @property
    def held_out(self) -> bool:
        siblings = [p for p in range(128) if family_of(p) == self.family]
        return self.program in sorted(siblings, key=lambda p: _hash(name_of(p)))[:HELD_OUT_PER_FAMILY]


@dataclass(frozen=True)
class Clip:
    instrument: Instrument
    number: int
    phrase: int  # index into PHRASES
    register: str
    loudness: str

    @property
    def key(self) -> str:
        return f"program{self.instrument.program:03d}_{self.number}"

    @property
    def captions(self) -> list[str]:
        words, _ = PHRASES[self.phrase]
        article = "an" if self.instrument.name[0] in "aeiou" else "a"
        return [f"{words.format(self.loudness)} on {article} {self.instrument.name}, {self.instrument.family}, "
                f"{self.register}", f"{self.instrument.name}, {self.instrument.family}"]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def name_of(program: int) -> str:
    """pretty_midi's General MIDI name in lower case without punctuation: "lead 1 square"."""
    name = pretty_midi.program_to_instrument_name(program).lower()
    return " ".join(name.replace("(", " ").replace(")", " ").replace("-", " ").split())


def family_of(program: int) -> str:
    return pretty_midi.program_to_instrument_class(program).lower()


def families() -> list[str]:
    return list(dict.fromkeys(family_of(p) for p in range(128)))  # in General MIDI's order


def clips_of(instrument: Instrument) -> list[Clip]:
    """The program's clips: distinct (phrase, register, loudness) combinations, drawn without
    replacement so that no two clips of one program are the same sound."""
    count = CLIPS["heldout" if instrument.held_out else "train"]
    combinations = list(itertools.product(range(len(PHRASES)), REGISTERS, LOUDNESS))
    drawn = random.Random(f"program {instrument.program}").sample(combinations, count)
    return [Clip(instrument, number, *combination) for number, combination in enumerate(drawn)]


def render(clip: Clip, soundfont: bytes) -> np.ndarray:
    """The clip's waveform [RATE·SECONDS] in [-1, 1], from a fresh synthesizer (no earlier tail)."""
    synth = tinysoundfont.Synth(samplerate=RATE)
    synth.program_select(0, synth.sfload(soundfont), 0, clip.instrument.program)
    _, steps = PHRASES[clip.phrase]
    root, velocity = REGISTERS[clip.register], LOUDNESS[clip.loudness]
    total = int(RATE * SECONDS)
    slot = total // len(steps)
    parts = []
    for index, step in enumerate(steps):
        length = slot if index < len(steps) - 1 else total - slot * index
        synth.noteon(0, root + step, velocity)
        parts.append(synth.generate(int(length * SOUNDING)))
        synth.noteoff(0, root + step)
        parts.append(synth.generate(length - int(length * SOUNDING)))
    stereo = np.frombuffer(b"".join(bytes(p) for p in parts), dtype=np.float32).reshape(-1, 2)  # [T, 2]
    mono = stereo.mean(axis=1)  # [T]
    return mono * (PEAK[clip.loudness] / max(float(np.abs(mono).max()), 1e-6))


def flac(waveform: np.ndarray) -> bytes:
    encoded = io.BytesIO()
    soundfile.write(encoded, waveform, RATE, format="FLAC", subtype="PCM_S8")
    return encoded.getvalue()


def samples(clips: list[Clip], soundfont: bytes, labels: dict[str, int] | None) -> list[dict]:
    out = []
    for clip in clips:
        sample = {"__key__": clip.key, "flac": flac(render(clip, soundfont)),
                  "json": json.dumps({"text": clip.captions, "program": clip.instrument.program}).encode()}
        if labels is not None:
            sample["cls"] = str(labels[clip.instrument.family]).encode()
        out.append(sample)
    return out


def build(output: Path, soundfont_path: Path) -> dict[str, int]:
    soundfont = soundfont_path.read_bytes()
    instruments = [Instrument(p, name_of(p), family_of(p)) for p in range(128)]
    labels = {family: index for index, family in enumerate(families())}
    split = {"audio_train": [c for i in instruments if not i.held_out for c in clips_of(i)],
             "audio_heldout": [c for i in instruments if i.held_out for c in clips_of(i)]}
    counts = {}
    for folder, clips in split.items():
        target = output / folder
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        held_out = folder == "audio_heldout"
        size = SHARD_SIZE if not held_out else len(clips) // 2
        write_shards(samples(clips, soundfont, labels if held_out else None), target / "%05d.tar", size, compress=True)
        if held_out:
            (target / "classnames.txt").write_text("".join(f"{f}\n" for f in families()))
        counts[folder] = len(clips)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soundfont", type=Path, default=SOUNDFONT,
                        help=f"sf_GMbank.sf2 of Debian's csound-soundfont (default {SOUNDFONT})")
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args()
    for folder, count in build(args.output, args.soundfont).items():
        print(f"{folder}: {count} clips")


if __name__ == "__main__":
    main()
