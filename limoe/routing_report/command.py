"""`limoe routing`: what a checkpoint's experts do with images (or audio or video clips) and text, in numbers and pictures.

A few held-out batches go through the model (eval mode, the chosen eval capacity); the routing
statistics of all of them are accumulated, and a few examples (chosen by key, or the first
batch's first) are kept token by token for the pictures: which expert each image patch (or
spectrogram patch of a clip, with `--modality audio`; tubelet of a video clip, with `--modality
video`, one grid per tubelet step) and caption token went to, in one chosen MoE block. With `compare`, a second checkpoint reads the same samples, so the two can be
set side by side (e.g. trained with and without the LIMoE entropy losses).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import open_clip
import torch
from torch import Tensor

from limoe.checkpoints import load_model
from limoe.checkpoints.training import checkpoint_sources
from limoe.config import Config, ModelConfig
from limoe.data.pipeline import eval_loader
from limoe.distributed import resolve_device
from limoe.errors import LimoeError
from limoe.evaluate.inputs import check_modality
from limoe.data.pipeline import loader_options
from limoe.files import atomic_write, check_output_directory, refuse_overwriting_inputs
from limoe.model.tower import PAD_TOKEN, Limoe
from limoe.data.preprocess import unnormalize
from limoe.model.routing import LayerRouting
from limoe.modalities import modality as registered_modality
from limoe.routing_report.pictures import write_pictures
from limoe.routing_report.records import CheckpointRouting, ExampleRouting
from limoe.routing_report.statistics import RoutingAccumulator, collapse_warnings, format_summary_table

NUM_EXAMPLES = 4  # images and captions pictured per checkpoint
WORKERS = 2  # data loader processes unless the caller says otherwise (`limoe routing --workers`)
SPECIAL_TOKENS = {"<start_of_text>": "<sot>", "<end_of_text>": "<eot>"}


def pictured_block(config: ModelConfig, block: Optional[int]) -> int:
    """The MoE block to picture: `block` if given, else the last MoE block."""
    if not config.moe_layers:
        raise LimoeError(f"model {config.name} has no MoE blocks (a dense model); there is no routing to inspect.")
    if block is None:
        return config.moe_layers[-1]
    if block not in config.moe_layers:
        raise LimoeError(
            f"block {block} of model {config.name} is not an MoE block; its MoE blocks are {list(config.moe_layers)}."
        )
    return block


@functools.lru_cache(maxsize=1)
def _tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.tokenizer.SimpleTokenizer()


def _decode(token_ids: list[int]) -> list[str]:
    """Each token id as its own text (byte-level pieces of one character may show as �)."""
    pieces = (_tokenizer().decode([token]).strip() for token in token_ids)
    return [SPECIAL_TOKENS.get(piece, piece) for piece in pieces]


def _pictures(model: Limoe, modality: str, inputs: Tensor) -> np.ndarray:
    """Inputs as the model saw them, for the pictures: images [k, 3, H, W] as the data pipeline
    normalises them → [k, H, W, 3] in [0, 1]; audio clips [k, T] → their normalised log-mel
    [k, n_mels, frames]; video clips [k, T, 3, S, S] → the first frame of each tubelet step side by
    side, [k, S, steps · S, 3] in [0, 1] (a filmstrip over the steps' expert grids)."""
    if modality == "image":
        return unnormalize(inputs.cpu()).permute(0, 2, 3, 1).numpy()
    if modality == "video":
        firsts = inputs[:, :: model.config.video.tubelet_frames]  # [k, steps, 3, S, S]
        frames = unnormalize(firsts.flatten(0, 1)).view(firsts.shape)  # [k, steps, 3, S, S]
        return frames.permute(0, 3, 1, 4, 2).flatten(2, 3).numpy()  # [k, S, steps · S, 3]
    embedder = model.embedders[modality]
    return ((embedder.log_mel(inputs) - embedder.mean) / embedder.std).float().cpu().numpy()


def _patch_count(config: ModelConfig, modality: str) -> int:
    """Patch tokens of one input: an image's patches, a clip's spectrogram patches or tubelets."""
    return {"image": config.num_patches, "audio": config.audio.num_patches, "video": config.video_tokens}[modality]


def _patch_grid(config: ModelConfig, modality: str, patches: Tensor) -> Tensor:
    """One example's values per patch [Np], in token order, → its patch grid: an image's [g, g]
    row-major; an audio clip's [F, T] frequency × time (its tokens run time-major, F per p frames);
    a video clip's [steps, g, g], each tubelet step's grid row-major (its tokens run time-major)."""
    side = config.image_size // config.patch_size
    if modality == "image":
        return patches.view(side, side)
    if modality == "video":
        return patches.view(config.video.steps, side, side)
    audio = config.audio
    return patches.view(audio.frames // audio.patch_size, audio.n_mels // audio.patch_size).T


def examples_of(model: Limoe, modality: str, keys: list[str], inputs: Tensor, tokens: Tensor, routing: LayerRouting,
                indices: list[int]) -> list[ExampleRouting]:
    """The examples at `indices` of a batch, split along the joint token layout of the MoE call:
    per example the streams in the model's order (`model.modalities`), the inputs' [class token if
    the modality's pooling is cls, Np patches] and the captions' L text positions: images before
    text, text before audio and video."""
    if not indices:  # nothing pictured from this batch (and no spectrogram of an empty batch: the FFT refuses one)
        return []
    config = model.config
    first_patch = 1 if registered_modality(modality).pool(config) == "cls" else 0
    lengths = {modality: first_patch + _patch_count(config, modality), "text": tokens.shape[1]}
    starts, start = {}, 0
    for name in config.modalities:
        if name in lengths:
            starts[name], start = start, start + lengths[name]
    patches = slice(starts[modality] + first_patch, starts[modality] + lengths[modality])
    text = slice(starts["text"], starts["text"] + lengths["text"])
    expert, kept = routing.expert[indices].cpu(), routing.kept_mask[indices].cpu()  # [k, N]
    tokens = tokens[indices].cpu()  # [k, L]
    examples = []
    for i, (index, picture) in enumerate(zip(indices, _pictures(model, modality, inputs[indices]))):
        real = tokens[i] != PAD_TOKEN  # [L]
        examples.append(ExampleRouting(
            key=keys[index], picture=picture,
            patch_experts=_patch_grid(config, modality, expert[i, patches]),
            patch_kept=_patch_grid(config, modality, kept[i, patches]),
            tokens=_decode(tokens[i][real].tolist()),
            token_experts=expert[i, text][real].tolist(),
            token_kept=kept[i, text][real].tolist(),
            modality=modality,
        ))
    return examples


def _chosen(batch_keys: list[str], keys: list[str], found: dict) -> list[int]:
    """Indices in a batch of the samples named by `keys` that are not pictured yet."""
    return [i for i, key in enumerate(batch_keys) if key in keys and key not in found]


def inspect_checkpoint(model: Limoe, config: Config, name: str, path: Path, data: str, num_batches: int,
                       batch_size: int, block: int, device: torch.device,
                       keys: Optional[list[str]] = None, workers: int = WORKERS,
                       modality: str = "image") -> CheckpointRouting:
    """Route `num_batches` batches of `data` (caption shards of `modality`'s inputs, routed jointly
    with their captions) through `model` for the statistics; the pictured examples in MoE block
    `block` are the samples named by `keys` (read on past `num_batches` until all are found), or
    else the first batch's first NUM_EXAMPLES."""
    position = config.model.moe_layers.index(block)
    loader = eval_loader(data, batch_size, config.model.image_size, config.model.context_length, workers,
                         **loader_options(config.model, modality))
    accumulator = RoutingAccumulator(config.model.moe_layers, config.model.modalities)
    found: dict[str, ExampleRouting] = {}
    first_key = None
    with torch.inference_mode():
        for index, batch in enumerate(loader):
            first_key = first_key or batch.keys[0]
            counted = index < num_batches
            if not counted and (keys is None or len(found) == len(keys)):
                break
            chosen = _chosen(batch.keys, keys, found) if keys is not None else (
                list(range(min(NUM_EXAMPLES, len(batch.keys)))) if index == 0 else [])
            if not counted and not chosen:
                continue  # reading on only for the keys not found yet
            inputs = batch.images.to(device)
            routing = model.encode({modality: inputs, "text": batch.tokens.to(device)})[1]
            if counted:
                accumulator.add(routing)
            for example in examples_of(model, modality, batch.keys, inputs, batch.tokens, routing[position], chosen):
                found[example.key] = example
    if first_key is None:
        raise LimoeError(f"no samples could be read from {data}; check the shard spec.")
    missing = [key for key in keys or [] if key not in found]
    if missing:
        raise LimoeError(f"--keys: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a sample key of "
                         f"{data}; give keys of its samples (the first is {first_key!r}).")
    examples = [found[key] for key in keys] if keys is not None else list(found.values())
    return CheckpointRouting(name, path, config, block, accumulator.statistics(), examples, modality)


def _names(paths: list[Path]) -> list[str]:
    """File names, or the full paths where two file names are the same."""
    names = [path.name for path in paths]
    return names if len(set(names)) == len(names) else [str(path) for path in paths]


def run_routing_report(checkpoint: Path, data: str, output: Union[str, Path], num_batches: int = 4, batch_size: int = 64,
                       capacity_factor: Optional[str] = None, compare: Optional[str] = None, device: str = "auto",
                       block: Optional[int] = None, keys: Optional[list[str]] = None, workers: int = WORKERS,
                       modality: str = "image") -> dict:
    """Write `output/routing.json` and the pictures, print the per-layer tables and the files
    written; returns the JSON.

    `capacity_factor`: None (each checkpoint's eval factor), 'dropless' or a number, applied to
    both checkpoints. `block`: the MoE block pictured (default: each checkpoint's last). `keys`:
    the samples pictured (default: the first batch's first NUM_EXAMPLES). `workers`: data loader
    processes (0: read in this process). `modality`: what `data` pairs with captions, image, audio
    or video (every checkpoint's model must embed it).
    """
    if num_batches < 1 or batch_size < 1:
        raise LimoeError("--num-batches and --batch-size must be at least 1.")
    if keys is not None and (not keys or not all(key.strip() for key in keys)):
        raise LimoeError("--keys has an empty key; give sample keys separated by commas, e.g. --keys 000000000,000000007.")
    keys = None if keys is None else list(dict.fromkeys(key.strip() for key in keys))
    output = check_output_directory(output, "--output")
    refuse_overwriting_inputs({"--output": output}, [*checkpoint_sources(checkpoint), *checkpoint_sources(compare), data])
    torch_device = torch.device(resolve_device(device))
    paths = [Path(checkpoint)] + ([Path(compare)] if compare else [])
    models = [load_model(path, str(torch_device), capacity_factor) for path in paths]  # bad input fails before work
    for model, _ in models:
        check_modality(model, modality)
    blocks = [pictured_block(config.model, block) for _, config in models]
    reports = [
        inspect_checkpoint(model, config, name, path, data, num_batches, batch_size, shown, torch_device, keys,
                           workers, modality)
        for (model, config), name, path, shown in zip(models, _names(paths), paths, blocks)
    ]
    result = {"data": data, "modality": modality, "num_batches": num_batches, "batch_size": batch_size,
              "checkpoints": [report.to_json() for report in reports]}
    text = json.dumps(result, indent=1)
    atomic_write(output / "routing.json", lambda tmp: tmp.write_text(text))
    pictures = write_pictures(reports, output)
    for report in reports:
        print(f"{report.name}:\n{format_summary_table(report.statistics)}")
        for warning in collapse_warnings(report.statistics):
            print(f"warning: {warning}")
    print(f"wrote {', '.join(['routing.json', *(path.name for path in pictures)])} to {output}")
    return result
