"""Evaluate limoe checkpoints with clip_benchmark (https://github.com/LAION-AI/CLIP_benchmark).

clip_benchmark builds models through loaders registered by name in `clip_benchmark.models`,
each returning (model, image transform, tokenizer); it has no plugin hook, so `register()` adds
`load_limoe` as model type 'limoe', and running this module registers it and hands the
arguments to clip_benchmark's own command line (`pip install 'limoe[eval]'` installs
clip_benchmark and the `requests` it imports without declaring it):

    python -m limoe.evaluate.clip_benchmark eval --model_type limoe --model limoe \\
        --pretrained model.safetensors --dataset wds/imagenet1k --dataset_root DIR

`--pretrained` takes any checkpoint reference: an exported file, a workdir, a model folder or
`hf-hub:org/name`.

`--model` is `limoe` for the checkpoint's eval capacity factor, or `limoe:dropless` /
`limoe:4.0` to override it, as `limoe eval --capacity-factor` does.

A local `wds/` dataset (`limoe shards build --classification --layout clip_benchmark` writes one)
is read by clip_benchmark's default 4 loader workers, and a worker left without a shard ends the
run in a webdataset error; without `--num_workers` each such dataset gets at most as many
workers as it has shards.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable, Optional

from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor
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
    in `limoe eval`. `cache_dir` (clip_benchmark's `--model_cache_dir`) is huggingface_hub's cache
    for `hf-hub:` checkpoints.
    """
    name, _, capacity_factor = model_name.partition(":")
    if name != MODEL_TYPE:
        raise LimoeError(f"clip_benchmark --model {model_name!r}: write 'limoe', 'limoe:dropless' or 'limoe:FACTOR'.")
    model, config = load_model(pretrained, device, capacity_factor or None, cache_dir)
    return model, eval_transform(config.model.image_size), tokenizer(config.model.context_length)


def topk_accuracy(logits: Tensor, target: Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """clip_benchmark's `accuracy(output, target, topk)`: per k, the fraction of rows [N, C] whose
    target [N] is among the k largest logits."""
    hits = logits.topk(max(topk), dim=1).indices == target[:, None]  # [N, K]
    return [hits[:, :k].any(dim=1).float().mean().item() for k in topk]


def register() -> None:
    """Make `--model_type limoe` known to clip_benchmark in this process, and put `topk_accuracy`
    in place of its `accuracy` helper: clip_benchmark 1.6.2's converts a one-element array with
    `float()`, which NumPy ≥ 2.4 (what a fresh install resolves to) refuses with "TypeError: only
    0-dimensional arrays can be converted to Python scalars" (LAION-AI/CLIP_benchmark#147)."""
    from clip_benchmark import models
    from clip_benchmark.metrics import zeroshot_classification

    models.TYPE2FUNC[MODEL_TYPE] = load_limoe
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the list clip_benchmark's parser takes its choices from
    zeroshot_classification.accuracy = topk_accuracy


def local_shard_count(args) -> Optional[int]:
    """The shard count of the local `wds/` dataset of one clip_benchmark run (its `nshards.txt`,
    where clip_benchmark's `build_wds_dataset` reads it), or None for any other dataset."""
    if not args.dataset.startswith("wds/"):
        return None
    name = args.dataset.removeprefix("wds/")
    root = args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
    try:
        return int((Path(root) / args.split / "nshards.txt").read_text().strip())
    except (OSError, ValueError):
        return None  # remote, or not there: clip_benchmark reports it


def workers_at_most_shards(run: Callable) -> Callable:
    """clip_benchmark's per-dataset `run(args)`, with `num_workers` capped at the dataset's shard count."""

    def capped(args) -> None:
        shards = local_shard_count(args)
        if shards is not None and args.num_workers > shards:
            args = copy.copy(args)
            args.num_workers = max(shards, 1)
        run(args)

    return capped


def main(argv: list[str]) -> int:
    """clip_benchmark's command line, with the limoe model type registered and, unless
    `--num_workers` is given, local `wds/` datasets read by at most one worker per shard."""
    register()
    from clip_benchmark import cli
    from clip_benchmark.cli import main as clip_benchmark_main

    if not any(arg == "--num_workers" or arg.startswith("--num_workers=") for arg in argv):
        cli.run = workers_at_most_shards(cli.run)  # main_eval calls the module's run once per dataset
    sys.argv = ["clip_benchmark", *argv]  # clip_benchmark's parser reads sys.argv
    try:
        clip_benchmark_main()
    except LimoeError as error:
        print(f"limoe: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
