"""Class names and prompt templates for zero-shot classification.

The defaults are open_clip's ImageNet-1k class names (OpenAI's curated list, in synset order)
and its prompt sets: the 80 templates of the CLIP paper ('openai') or the 7-template subset
('simple'). A templates file holds one template per line with `{c}` (clip_benchmark's files) or
`{}` where the class name goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from limoe.errors import LimoeError
from limoe.files import read_text_file

Template = Union[str, Callable[[str], str]]
TEMPLATE_SETS = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty lines of a text file, stripped; a missing or empty file is an error."""
    lines = [line.strip() for line in read_text_file(path, f"{what} file").splitlines() if line.strip()]
    if not lines:
        raise LimoeError(f"{what} file {path} is empty; write one entry per line.")
    return lines


def load_classnames(path: Optional[Path]) -> list[str]:
    """Class names from a file (one per line, in label order), or ImageNet-1k's."""
    return list(IMAGENET_CLASSNAMES) if path is None else read_lines(path, "class names")


def load_templates(choice: Optional[str]) -> Sequence[Template]:
    """'openai' (the default), 'simple', or a file of templates, as open_clip's classifier
    builder takes them: callables, or `str.format` strings with one `{}`."""
    if choice is None or choice in TEMPLATE_SETS:
        return TEMPLATE_SETS[choice or "openai"]
    templates = [line.replace("{c}", "{}") for line in read_lines(Path(choice), "templates")]
    missing = [t for t in templates if t.count("{}") != 1]
    if missing:
        raise LimoeError(
            f"template {missing[0]!r} in {choice} needs exactly one {{c}} where the class name goes, "
            f"e.g. 'a photo of a {{c}}.'."
        )
    return templates


def class_prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """Every class's prompts, class-major (class 0 with each template, then class 1, …): the order
    open_clip's zero-shot classifier builder encodes them in, which training on class names shares."""
    return [template(name) if callable(template) else template.format(name)
            for name in classnames for template in templates]
