"""The `limoe` command: parse arguments, load the config, call the library. Nothing else.

Every subcommand's work lives in a library module so tests and notebooks call the same code.
A `LimoeError` (bad input) becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

from limoe.errors import LimoeError


def _info(args) -> int:
    from limoe.config import load_model_config
    from limoe.model.info import describe_model

    print(describe_model(load_model_config(args.model, args.set)))
    return 0


def _train(args) -> int:
    from limoe.config import load_config
    from limoe.training.trainer import train

    config = load_config(args.config, args.set)
    train(config, Path(args.workdir))
    return 0


def _pretrain(args) -> int:
    from limoe.config import load_config
    from limoe.pretraining.command import pretrain

    config = load_config(args.config, args.set, kind="pretrain")
    pretrain(config, Path(args.workdir))
    return 0


def _export(args) -> int:
    from limoe.checkpoints.training import export_workdir

    export_workdir(Path(args.workdir), Path(args.output))
    return 0


def _eval_zeroshot(args) -> int:
    from limoe.evaluate import run_zeroshot

    run_zeroshot(
        checkpoint=Path(args.checkpoint), data=args.data, classnames=args.classnames, templates=args.templates,
        output=args.output, batch_size=args.batch_size, capacity_factor=args.capacity_factor, device=args.device,
        workers=args.workers,
    )
    return 0


def _eval_retrieval(args) -> int:
    from limoe.evaluate import run_retrieval

    run_retrieval(
        checkpoint=Path(args.checkpoint), data=args.data, output=args.output, batch_size=args.batch_size,
        capacity_factor=args.capacity_factor, device=args.device, workers=args.workers,
    )
    return 0


def _eval_knn(args) -> int:
    from limoe.evaluate.knn import run_knn

    run_knn(
        checkpoint=Path(args.checkpoint), data=args.data, k=args.k, output=args.output, batch_size=args.batch_size,
        capacity_factor=args.capacity_factor, device=args.device, workers=args.workers, random_init=args.random_init,
    )
    return 0


def _routing(args) -> int:
    from limoe.routing_report.command import run_routing_report

    run_routing_report(
        checkpoint=Path(args.checkpoint), data=args.data, output=Path(args.output), num_batches=args.num_batches,
        batch_size=args.batch_size, capacity_factor=args.capacity_factor, compare=args.compare, device=args.device,
        block=args.block,
    )
    return 0


def _shards_build(args) -> int:
    from limoe.data.shards import build_shards

    counts = build_shards(
        images=Path(args.images), captions=Path(args.captions) if args.captions else None, output=Path(args.output),
        image_size=args.image_size, maxcount=args.maxcount, classification=args.classification,
    )
    print(" ".join(f"{key}={value}" for key, value in counts.items()))
    return 0


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="exported .safetensors file or a training workdir")
    parser.add_argument("--data", required=True, help="shards (spec, directory) or an image folder tree")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--capacity-factor", default=None,
                        help="eval capacity factor, or 'dropless' (default: the checkpoint's config)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default=None, help="write the metrics to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="limoe", description="LIMoE sparse mixture-of-experts contrastive models")
    # The deepspeed launcher puts --local_rank=N before the subcommand; the rank is read from the
    # environment (LOCAL_RANK), which every launcher sets, so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help: str, parent=commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    info = command("info", _info, "print a model's architecture and parameter counts")
    info.add_argument("model", help="a model config name (limoe-b16) or a .yaml path")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")

    train = command("train", _train, "train a model on webdataset shards (resumes in an existing workdir)")
    train.add_argument("--config", default=None, help="training config name or path (default: demo)")
    train.add_argument("--workdir", default="runs/demo", help="checkpoints, metrics and logs go here")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    pretrain = command("pretrain", _pretrain, "masked image and caption pretraining of the tower (resumes in an existing workdir)")
    pretrain.add_argument("--config", default=None, help="pretraining config name or path (default: configs/pretrain/demo.yaml)")
    pretrain.add_argument("--workdir", default="runs/pretrain", help="checkpoints, metrics and logs go here")
    pretrain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    export = command("export", _export, "write a training run's weights as one consolidated .safetensors file")
    export.add_argument("--workdir", required=True)
    export.add_argument("--output", required=True)

    evaluate = command("eval", None, "evaluate a checkpoint")
    evaluations = evaluate.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    zeroshot = command("zeroshot", _eval_zeroshot, "zero-shot classification (ImageNet by default)", evaluations)
    _add_eval_options(zeroshot)
    zeroshot.add_argument("--classnames", default=None, help="class names file, one per line (default: ImageNet-1k)")
    zeroshot.add_argument("--templates", default=None, help="'openai' (80, default), 'simple', or a file")
    retrieval = command("retrieval", _eval_retrieval, "image-text retrieval recall@1/5/10", evaluations)
    _add_eval_options(retrieval)
    knn = command("knn", _eval_knn, "leave-one-out k-NN top-1 of the image tokens on classification shards", evaluations)
    _add_eval_options(knn)
    knn.add_argument("--k", type=int, default=5, help="neighbours that vote (default 5)")
    knn.add_argument("--random-init", action="store_true", help="also measure the same architecture freshly initialised")

    routing = command("routing", _routing, "expert routing statistics and plots for a checkpoint")
    routing.add_argument("--checkpoint", required=True)
    routing.add_argument("--data", required=True)
    routing.add_argument("--output", required=True, help="directory for routing.json and the plots")
    routing.add_argument("--num-batches", type=int, default=4)
    routing.add_argument("--batch-size", type=int, default=64)
    routing.add_argument("--capacity-factor", default=None, help="a number or 'dropless' (default: config)")
    routing.add_argument("--compare", default=None, help="a second checkpoint to put side by side")
    routing.add_argument("--block", type=int, default=None, help="MoE block for the patch and token maps (default: last)")
    routing.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    shards = command("shards", None, "build webdataset shards")
    shard_commands = shards.add_subparsers(dest="shard_command", required=True, metavar="ACTION")
    build = command("build", _shards_build, "write img2dataset-layout shards from images and captions", shard_commands)
    build.add_argument("--images", required=True, help="folder of images (or class folders with --classification)")
    build.add_argument("--captions", default=None, help="CSV or JSONL mapping file name to caption")
    build.add_argument("--output", required=True)
    build.add_argument("--image-size", type=int, default=None, help="resize the shorter side and center-crop")
    build.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    build.add_argument("--classification", action="store_true", help="write .cls labels and classnames.txt")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LimoeError as error:
        print(f"limoe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("limoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
