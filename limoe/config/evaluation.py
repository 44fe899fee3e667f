"""`eval`: what a run evaluates while it trains (`train.eval_every`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from limoe.config.keys import setting


@dataclass(frozen=True)
class ZeroshotEvalConfig:
    """Zero-shot classification during training, as `limoe eval zeroshot` does it."""

    data: Optional[str] = setting(None, "labelled images: an ImageNet-style class-folder tree, a clip_benchmark "
                                        "folder or webdataset shards with .cls; null: no zero-shot evaluation")
    classnames: Optional[str] = setting(None, "class names, one per line; null: classnames.txt beside the shards, "
                                              "else ImageNet-1k's")
    templates: str = setting("openai", "prompt templates: openai (CLIP's 80), simple, or a file with one per line")


@dataclass(frozen=True)
class AudioZeroshotEvalConfig(ZeroshotEvalConfig):
    """Zero-shot classification of audio clips during training, as `limoe eval zeroshot --modality
    audio` does it: the image keys, with audio's data and default templates."""

    data: Optional[str] = setting(None, "labelled clips: audio shards with .cls (a clip_benchmark-style folder or "
                                        "shards); null: no zero-shot evaluation of audio")
    templates: str = setting("sounds", "prompt templates: sounds (limoe's 6 for sounds), openai, simple, or a file "
                                       "with one per line")


@dataclass(frozen=True)
class AudioEvalConfig:
    """The same evaluations on audio held-out sets, for a model whose model.modalities include audio
    (`limoe eval --modality audio` on that step's checkpoint gives the same numbers)."""

    zeroshot: AudioZeroshotEvalConfig = field(default_factory=AudioZeroshotEvalConfig)
    retrieval: Optional[str] = setting(None, "audio caption shards for audio↔text recall@1/5/10; null: none")

    @property
    def sets(self) -> list[str]:
        """The keys of the sets given, as a user writes them."""
        given = {"eval.audio.zeroshot.data": self.zeroshot.data, "eval.audio.retrieval": self.retrieval}
        return [key for key, value in given.items() if value is not None]


@dataclass(frozen=True)
class EvalConfig:
    """What train.eval_every evaluates: every rank reads the whole set and the ranks take turns
    encoding it (the expert all-to-all needs them all), with the same code and numbers as
    `limoe eval` on that step's checkpoint."""

    zeroshot: ZeroshotEvalConfig = field(default_factory=ZeroshotEvalConfig)
    retrieval: Optional[str] = setting(None, "caption shards for image↔text recall@1/5/10; null: none")
    batch_size: int = setting(64, "images (or clips) per evaluation forward on each rank", "[1, inf)")
    audio: AudioEvalConfig = field(default_factory=AudioEvalConfig)
