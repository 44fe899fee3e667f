"""Evaluate limoe checkpoints with clip_benchmark (https://github.com/LAION-AI/CLIP_benchmark).

clip_benchmark builds models through loaders registered by name in `clip_benchmark.models`,
each returning (model, image transform, tokenizer); it has no plugin hook, so `register()` adds
`load_limoe` as model type 'limoe', and running this module registers it and hands the
arguments to clip_benchmark's own command line:

    python -m limoe.evaluate.clip_benchmark eval --model_type limoe --model limoe \\
        --pretrained model.safetensors --dataset wds/imagenet1k --dataset_root DIR

`--model` is `limoe` for the checkpoint's eval capacity factor, or `limoe:dropless` /
`limoe:4.0` to override it, as `limoe eval --capacity-factor` does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from open_clip.tokenizer import SimpleTokenizer
from torchvision.transforms import Compose

from limoe.checkpoints import load_model
from limoe.errors import LimoeError
from limoe.data.preprocess import eval_transform, tokenizer
from limoe.model.tower import Limoe

MODEL_TYPE = "limoe"


def load_limoe(model_name: str, pretrained: str, device: str = "cpu",
               cache_dir: Optional[str] = None) -> tuple[Limoe, Compose, SimpleTokenizer]:
    """(model, transform, tokenizer) of the checkpoint `pretrained`, clip_benchmark's loader contract.

    The transform and tokenizer follow the checkpoint's config (image size, context length), as
    in `limoe eval`. `cache_dir` is part of the contract and unused: checkpoints are local files.
    """
    name, _, capacity_factor = model_name.partition(":")
    if name != MODEL_TYPE:
        raise LimoeError(f"clip_benchmark --model {model_name!r}: write 'limoe', 'limoe:dropless' or 'limoe:FACTOR'.")
    model, config = load_model(Path(pretrained), device, capacity_factor or None)
    return model, eval_transform(config.model.image_size), tokenizer(config.model.context_length)


def register() -> None:
    """Make `--model_type limoe` known to clip_benchmark in this process."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_limoe
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the list clip_benchmark's parser takes its choices from


def main(argv: list[str]) -> int:
    """clip_benchmark's command line, with the limoe model type registered."""
    register()
    from clip_benchmark.cli import main as clip_benchmark_main

    sys.argv = ["clip_benchmark", *argv]  # clip_benchmark's parser reads sys.argv
    try:
        clip_benchmark_main()
    except LimoeError as error:
        print(f"limoe: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
