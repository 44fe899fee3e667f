"""Class names and prompt templates for zero-shot classification.

The defaults are open_clip's ImageNet-1k class names (OpenAI's curated list, in synset order)
and its prompt sets: the 80 templates of the CLIP paper ('openai') or the 7-template subset
('simple'); for audio, 'sounds' (`SOUND_TEMPLATES`, the default for audio); for video, 'videos'
(`VIDEO_TEMPLATES`, the default for video). A templates file holds one template per line with `{c}` (clip_benchmark's files) or
`{}` where the class name goes. Templates are `str.format` strings, so a template is checked
where it is read: exactly one class placeholder and no other replacement field (no `{x}`, no
`{0.attr}` or `{0[i]}` access, no conversion or format spec); `{{` and `}}` stand for braces.

Evaluation, training on class names, prompt tuning, model files (a tuned label set) and shard
writing (clip_benchmark's templates file) all read them, so they sit below all of those.
open_clip, slow to import, is imported when its lists are asked for: `limoe shards build` needs
them only for the clip_benchmark layout.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from limoe.errors import LimoeError
from limoe.files import read_text_file

Template = Union[str, Callable[[str], str]]
TEMPLATE_SETS = ("openai", "simple", "sounds", "videos")  # open_clip's OPENAI/SIMPLE_IMAGENET_TEMPLATES; ours
DEFAULT_TEMPLATES = {"image": "openai", "audio": "sounds", "video": "videos"}  # used when none is given, by modality
# Audio prompts: LAION-CLAP's zero-shot prompt ("this is a sound of …"), the "sound of" / "recording
# of" phrasings of AudioCLIP and Wav2CLIP's evaluations, and the bare class name.
SOUND_TEMPLATES = (
    "the sound of a {}.",
    "a recording of a {}.",
    "this is a sound of {}.",
    "a {} playing.",
    "a sound made by a {}.",
    "{}",
)
# Video prompts: action and motion phrasings for class names that say what happens in a clip
# ("moving left", "playing guitar"), after the "a video of a person {}" prompts of ActionCLIP's and
# X-CLIP's Kinetics evaluations, and the bare class name.
VIDEO_TEMPLATES = (
    "a video of something {}.",
    "a video of a person {}.",
    "a clip of something {}.",
    "footage of something {}.",
    "a video showing {}.",
    "{}",
)
TEMPLATES_OF_OURS = {"sounds": SOUND_TEMPLATES, "videos": VIDEO_TEMPLATES}


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty lines of a text file, stripped; a missing or empty file is an error."""
    lines = [line.strip() for line in read_text_file(path, f"{what} file").splitlines() if line.strip()]
    if not lines:
        raise LimoeError(f"{what} file {path} is empty; write one entry per line.")
    return lines


def load_classnames(path: Optional[Path]) -> list[str]:
    """Class names from a file (one per line, in label order), or ImageNet-1k's."""
    if path is not None:
        return read_lines(path, "class names")
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def load_templates(choice: Optional[str], modality: str = "image") -> Sequence[Template]:
    """'openai', 'simple', 'sounds', 'videos', or a file of templates, as open_clip's classifier
    builder takes them: callables, or `str.format` strings with one `{}`. None: `modality`'s default
    set ('openai' for images, 'sounds' for audio, 'videos' for video)."""
    choice = choice or DEFAULT_TEMPLATES[modality]
    if choice in TEMPLATES_OF_OURS:
        return TEMPLATES_OF_OURS[choice]
    if choice in TEMPLATE_SETS:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        return {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}[choice]
    return [class_template(line, f"templates file {choice}") for line in read_lines(Path(choice), "templates")]


def class_template(template: str, source: str) -> str:
    """`template` with its one class placeholder (`{c}` or `{}`) written `{}`, ready for
    `str.format(name)`; any other replacement field, or none, is an error naming the template and
    `source` (where it was read). Parsed with `string.Formatter`, as `str.format` reads it."""
    problem, pieces = None, []
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as error:  # a lone '{' or '}'
        fields, problem = [], f"is not a valid format string ({error})"
    for literal, field, format_spec, conversion in fields:
        pieces.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field not in ("", "c") or format_spec or conversion:
            problem = problem or f"has the field {{{field}{'!' + conversion if conversion else ''}" \
                                 f"{':' + format_spec if format_spec else ''}}}, which is not the class placeholder"
        pieces.append("{}")
    placeholders = sum(field is not None for _, field, _, _ in fields)
    if problem is None and placeholders != 1:
        problem = f"has {placeholders} class placeholders"
    if problem is not None:
        raise LimoeError(f"template {template!r} in {source} {problem}; write exactly one {{c}} (or {{}}) where the "
                         f"class name goes and {{{{ }}}} for literal braces, e.g. 'a photo of a {{c}}.'.")
    return "".join(pieces)


def class_prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """Every class's prompts, class-major (class 0 with each template, then class 1, …): the order
    open_clip's zero-shot classifier builder encodes them in, which training on class names shares."""
    return [template(name) if callable(template) else template.format(name)
            for name in classnames for template in templates]
