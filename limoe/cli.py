"""The `limoe` command: parse arguments, load the config, call the library. Nothing else.

Every subcommand's work lives in a library module so tests and notebooks call the same code.
Each handler imports that module itself: building the parser imports no torch, so `--help` and
`--version` answer at once and a command pays only for the libraries it uses.
A `LimoeError` (bad input) becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path
from typing import Callable, Optional

from limoe import __version__
from limoe.errors import LimoeError


def _info(args) -> int:
    from limoe.config import load_model_config
    from limoe.model.info import describe_model

    print(describe_model(load_model_config(args.model, args.set)))
    return 0


def _train(args) -> int:
    from limoe.config import load_config
    from limoe.train_command import train

    config = load_config(args.config, args.set)
    train(config, Path(args.workdir))
    return 0


def _pretrain(args) -> int:
    from limoe.config import load_config
    from limoe.pretraining.command import pretrain

    config = load_config(args.config, args.set, kind="pretrain")
    pretrain(config, Path(args.workdir))
    return 0


def _config_show(args) -> int:
    from limoe.config import load_config
    from limoe.config.docs import describe_config

    print(describe_config(load_config(args.config, args.set)), end="")
    return 0


def _plan(args) -> int:
    from limoe.config import load_config
    from limoe.plan import GiB, format_plan, plan_memory

    config = load_config(args.config, args.set)
    plan = plan_memory(config, args.gpus, int(args.gpu_memory * GiB))
    print(format_plan(plan, args.config or "demo", args.set))
    return 0 if plan.fits(plan.configured) else 1


def _export(args) -> int:
    from limoe.checkpoints.training import export_workdir

    export_workdir(Path(args.workdir), args.output, hub_layout=args.format == "hf", repo_id=args.repo_id)
    return 0


def _model_options(args) -> dict:
    """What every command that runs a checkpoint's model passes on from its shared options
    (`_add_model_options`)."""
    return {"checkpoint": Path(args.checkpoint), "data": args.data, "batch_size": args.batch_size,
            "capacity_factor": args.capacity_factor, "device": args.device, "workers": args.workers}


def _evaluation(name: str, *options: str) -> Callable:
    """The handler of `limoe eval NAME`: `limoe.evaluate.NAME.run_NAME` with the shared model options,
    `--output` and this evaluation's own `options` (argparse destinations, passed by the same name).
    The module is imported when the command runs, so `limoe eval --help` loads no torch."""

    def handler(args) -> int:
        run = getattr(importlib.import_module(f"limoe.evaluate.{name}"), f"run_{name}")
        run(output=args.output, **{option: getattr(args, option) for option in options}, **_model_options(args))
        return 0

    return handler


def _tune(args) -> int:
    from limoe.tuning import TuneRecipe, run_tune

    options = {"lr": args.lr, "batch_size": args.tune_batch_size, "prompt_tokens": args.prompt_tokens, "seed": args.seed}
    recipe = TuneRecipe(steps=args.steps, **{name: value for name, value in options.items() if value is not None})
    run_tune(
        classnames=args.classnames, templates=args.templates, shots=args.shots, recipe=recipe, output=args.output,
        metrics_output=args.metrics, modality=args.modality, **_model_options(args),
    )
    return 0


def _routing(args) -> int:
    from limoe.routing_report.command import run_routing_report

    run_routing_report(
        output=args.output, num_batches=args.num_batches, compare=args.compare, block=args.block,
        keys=args.keys.split(",") if args.keys is not None else None, modality=args.modality, **_model_options(args),
    )
    return 0


def _shards_build(args) -> int:
    from limoe.data.shards import build_shards
    from limoe.files import check_output_directory

    output = check_output_directory(args.output, "--output")
    counts = build_shards(
        folder=Path(args.images or args.audio or args.video), output=output,
        captions=Path(args.captions) if args.captions else None,
        image_size=args.image_size, maxcount=args.maxcount, classification=args.classification, layout=args.layout,
        progress=True, modality="audio" if args.audio else "video" if args.video else "image",
    )
    print(" ".join(f"{key}={value}" for key, value in counts.items()))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one LimoeError line (exit status 2) instead of usage text."""

    def error(self, message: str):
        raise LimoeError(f"{message} (see `{self.prog} --help`).")


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An option type: an integer ≥ `minimum`, else an error naming the value and the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range; give a whole number ≥ {minimum}")
        return value

    return parse


def _positive_number(example: str, maximum: float = math.inf) -> Callable[[str], float]:
    """An option type: a number > 0 and finite (not nan or inf) or at most `maximum`, else an error
    naming the value, the range and `example`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give one such as {example}") from None
        if not (math.isfinite(value) and 0 < value <= maximum):
            bound = f" and ≤ {maximum:g}" if math.isfinite(maximum) else ""
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; give a finite number > 0{bound} such as {example}")
        return value

    return parse


def _capacity_factor(text: str) -> str:
    """An option type: 'dropless' or a positive, finite number (kept as text for the library)."""
    if text != "dropless":
        _positive_number("2.0, or 'dropless'")(text)
    return text


def _add_model_options(parser: argparse.ArgumentParser,
                       data: str = "shards (spec, directory) or an image folder tree") -> None:
    """The options of every command that runs a checkpoint over a data set."""
    parser.add_argument("--checkpoint", required=True,
                        help="exported .safetensors file, training workdir (or one of its checkpoint directories), "
                             "model folder or hf-hub:org/name")
    parser.add_argument("--data", required=True, help=data)
    parser.add_argument("--batch-size", type=_whole_number(1), default=64, help="images per forward pass")
    parser.add_argument("--capacity-factor", type=_capacity_factor, default=None,
                        help="eval capacity factor, or 'dropless' (default: the checkpoint's config)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=_whole_number(0), default=2)


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument("--output", default=None, help="write the metrics to this JSON file")


def _add_placement_options(parser: argparse.ArgumentParser) -> None:
    """Where images are resized and decoded, as data.resize_on and data.decode_on say for training."""
    parser.add_argument("--resize-on", default="worker", choices=["worker", "device"],
                        help="where the images are resized and centre-cropped: in the data workers (PIL), or on "
                             "the model's device")
    parser.add_argument("--decode-on", default="worker", choices=["worker", "device"],
                        help="where shards' images are decoded: in the data workers (PIL), or on the model's device "
                             "(nvJPEG on CUDA; what it cannot decode falls back to the CPU, counted); device needs "
                             "--resize-on device")


def _add_modality_option(parser: argparse.ArgumentParser, verb: str = "evaluate") -> None:
    """Which inputs are read with the captions: images, or the clips of audio or video shards."""
    parser.add_argument("--modality", default="image", choices=["image", "audio", "video"],
                        help=f"{verb} images (default), audio clips or video clips (audio or video shards; needs a "
                             "model whose model.modalities include that modality)")


def _add_still_frame_option(parser: argparse.ArgumentParser) -> None:
    """The single-frame baseline of a video evaluation."""
    parser.add_argument("--still-frame", action="store_true",
                        help="with --modality video: evaluate each clip as its centre frame repeated (a still picture, "
                             "no motion); the result without the flag minus this one is how much of it needs time")


def _add_overrides(parser: argparse.ArgumentParser, keys: str = "config") -> None:
    """`--set KEY=VALUE`, repeatable: the overrides `limoe.config` applies on top of the file."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a {keys} key")


def _add_config_options(parser: argparse.ArgumentParser, kind: str = "training", default: str = "demo") -> None:
    """The options of every command that reads a training or pretraining config: which one, and overrides."""
    parser.add_argument("--config", default=None, help=f"{kind} config name or path (default: {default})")
    _add_overrides(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="limoe", description="LIMoE sparse mixture-of-experts contrastive models")
    # The deepspeed launcher puts --local_rank=N before the subcommand; the rank is read from the
    # environment (LOCAL_RANK), which every launcher sets, so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help: str, parent=commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    info = command("info", _info, "print a model's architecture and parameter counts")
    info.add_argument("model", help="a model config name (limoe-b16) or a .yaml path")
    _add_overrides(info, keys="model")

    train = command("train", _train, "train a model on webdataset shards (resumes in an existing workdir)")
    _add_config_options(train)
    train.add_argument("--workdir", default="runs/demo", help="checkpoints, metrics and logs go here")

    pretrain = command("pretrain", _pretrain, "masked image (audio, video) and caption pretraining of the tower (resumes in an existing workdir)")
    _add_config_options(pretrain, kind="pretraining", default="configs/pretrain/demo.yaml")
    pretrain.add_argument("--workdir", default="runs/pretrain", help="checkpoints, metrics and logs go here")

    config = command("config", None, "inspect training configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = command("show", _config_show, "print the resolved config with each key's meaning and valid values",
                   config_commands)
    _add_config_options(show)

    plan = command("plan", _plan, "per-GPU memory of a training config and the micro-batch and "
                                  "checkpointing settings that fit (exit 1 if the configured ones do not)")
    _add_config_options(plan)
    plan.add_argument("--gpus", type=_whole_number(1), required=True, help="number of GPUs (processes) of the run")
    plan.add_argument("--gpu-memory", type=_positive_number("80", maximum=1e6), required=True, metavar="GIB",
                      help="memory of one GPU in GiB, e.g. 80")

    export = command("export", _export, "write a training run's weights as one consolidated .safetensors file")
    export.add_argument("--workdir", required=True)
    export.add_argument("--output", required=True, help="the .safetensors file, or the folder with --format hf")
    export.add_argument("--format", default="safetensors", choices=["safetensors", "hf"],
                        help="hf: a model folder in Hugging Face layout (weights, config JSON, model card)")
    export.add_argument("--repo-id", default=None, metavar="ORG/NAME", help="the Hub name the model card loads")

    evaluate = command("eval", None, "evaluate a checkpoint")
    evaluations = evaluate.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    zeroshot = command("zeroshot", _evaluation("zeroshot", "classnames", "templates", "candidate_images",
                                                 "resize_on", "decode_on", "modality", "still_frame"),
                       "zero-shot classification (ImageNet by default)", evaluations)
    _add_eval_options(zeroshot)
    _add_placement_options(zeroshot)
    _add_modality_option(zeroshot)
    _add_still_frame_option(zeroshot)
    zeroshot.add_argument("--classnames", default=None,
                          help="class names file, one per line (default: the data's classnames.txt or class folder "
                               "names, else ImageNet-1k's)")
    zeroshot.add_argument("--templates", default=None,
                          help="'openai' (80, default for images), 'simple', 'sounds' (6, default for audio), 'videos' "
                               "(6, default for video), or a file")
    zeroshot.add_argument("--candidate-images", default=None, metavar="DIR",
                          help="classes given by exemplar images, one sub-folder per class, instead of names")
    retrieval = command("retrieval", _evaluation("retrieval", "resize_on", "decode_on", "modality", "still_frame"),
                        "image-text (or audio-text, video-text) retrieval recall@1/5/10", evaluations)
    _add_eval_options(retrieval)
    _add_placement_options(retrieval)
    _add_modality_option(retrieval)
    _add_still_frame_option(retrieval)
    knn = command("knn", _evaluation("knn", "k", "random_init", "resize_on", "decode_on", "modality",
                                       "still_frame"),
                  "leave-one-out k-NN top-1 of the image (audio, video) tokens on classification shards", evaluations)
    _add_eval_options(knn)
    _add_placement_options(knn)
    _add_modality_option(knn)
    _add_still_frame_option(knn)
    knn.add_argument("--k", type=_whole_number(1), default=5,
                     help="neighbours that vote (default 5; at most the number of labelled images − 1)")
    knn.add_argument("--random-init", action="store_true", help="also measure the same architecture freshly initialised")

    choice = command("choice", _evaluation("choice", "format", "subsets", "ties"),
                     "choose among candidate images or texts (SugarCrepe, Winoground, JSONL)", evaluations)
    _add_eval_options(choice)
    choice.add_argument("--format", required=True, choices=["sugar_crepe", "winoground", "jsonl"])
    choice.add_argument("--subsets", nargs="+", default=None,
                        help="SugarCrepe subsets (<NAME>.json files; default: every SugarCrepe subset present)")
    choice.add_argument("--ties", default="first", choices=["first", "strict"],
                        help="a top score shared by candidates goes to the earlier one, as in clip_benchmark "
                             "(first, default), or counts as wrong (strict)")

    tune = command("tune", _tune, "few-shot prompt tuning of a checkpoint on a labelled set (Uni-Perceiver)")
    _add_model_options(tune, data="labelled images: class folders or shards with .cls (audio shards with .cls with "
                                   "--modality audio)")
    _add_modality_option(tune, verb="tune on")
    tune.add_argument("--classnames", default=None, help="class names file (default: the data's classnames.txt)")
    tune.add_argument("--templates", default=None,
                      help="'openai' (80, default for images), 'simple', 'sounds' (default for audio), or a file")
    tune.add_argument("--shots", type=_whole_number(1), required=True,
                      help="support samples per class; the rest are the queries it is scored on")
    tune.add_argument("--steps", type=_whole_number(0), required=True, help="optimizer steps")
    tune.add_argument("--output", required=True, help="the tuned model file (.safetensors)")
    # Recipe options default to limoe.tuning.TuneRecipe's values (docs/EVALUATION.md lists them).
    tune.add_argument("--lr", type=_positive_number("1e-3"), default=None, help="peak learning rate (default 1e-3)")
    tune.add_argument("--tune-batch-size", type=_whole_number(1), default=None,
                      help="support images per step (default 64)")
    tune.add_argument("--prompt-tokens", type=_whole_number(1), default=None,
                      help="deep prompt tokens per block (default 10)")
    tune.add_argument("--seed", type=_whole_number(0), default=None,
                      help="support draw, prompt init, batch order (default 0)")
    tune.add_argument("--metrics", default=None, help="write the query metrics to this JSON file")

    routing = command("routing", _routing, "expert routing statistics and plots for a checkpoint")
    _add_model_options(routing, data="held-out image-text shards (spec or directory)")
    routing.add_argument("--output", required=True, help="directory for routing.json and the plots")
    routing.add_argument("--num-batches", type=_whole_number(1), default=4)
    routing.add_argument("--compare", default=None, help="a second checkpoint to put side by side")
    routing.add_argument("--block", type=int, default=None, help="MoE block for the patch and token maps (default: last)")
    routing.add_argument("--keys", default=None, metavar="K1,K2,…",
                         help="sample keys of the examples pictured (default: the first batch's first four)")
    _add_modality_option(routing, verb="route")

    shards = command("shards", None, "build webdataset shards")
    shard_commands = shards.add_subparsers(dest="shard_command", required=True, metavar="ACTION")
    build = command("build", _shards_build, "write shards from images, audio or video and captions (img2dataset's "
                    "layout, LAION-CLAP's for audio and video)", shard_commands)
    inputs = build.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", help="folder of images (or class folders with --classification)")
    inputs.add_argument("--audio", help="folder of flac, wav, ogg, opus or mp3 files (or class folders with "
                                        "--classification), stored as they are")
    inputs.add_argument("--video", help="folder of mp4 or webm files, or png/jpg filmstrips of square frames side by "
                                        "side (or class folders with --classification), stored as they are")
    build.add_argument("--captions", default=None, help="CSV, TSV or JSONL mapping file name to caption (open_clip's filepath/title columns too)")
    build.add_argument("--output", required=True)
    build.add_argument("--image-size", type=_whole_number(1), default=None,
                       help="resize the shorter side and center-crop")
    build.add_argument("--maxcount", type=_whole_number(1), default=1000, help="samples per shard")
    build.add_argument("--classification", action="store_true", help="write .cls labels and classnames.txt")
    build.add_argument("--layout", default="img2dataset", choices=["img2dataset", "clip_benchmark"],
                       help="clip_benchmark: a classification set as clip_benchmark's wds datasets are stored "
                            "(test/N.tar, test/nshards.txt, classnames.txt, templates)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except LimoeError as error:
        print(f"limoe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("limoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
