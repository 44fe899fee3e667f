"""Starting a run from another run's weights (`train.init_from`), e.g. contrastive training from
`limoe pretrain`'s model: an exported model file or a workdir's newest complete training
checkpoint (limoe's code-free format; nothing is unpickled), loaded into a freshly built model of
the same architecture (fine-tuning), or of the MoE architecture whose dense twin the source is
(sparse upcycling: every expert a copy of the block's dense MLP, the router fresh). Only weights
move; optimizer, schedule and step start fresh.

Strict on purpose: every tensor of the new model must be found with its shape, and a source may
hold no tensor the model lacks, or the run stops with one line naming the tensor; an ignored
tensor usually means the wrong file. The exceptions are the contrastive loss's own parameters
(`LOSS_PARAMETERS`): SigLIP's bias exists only under that loss, so it is taken when both sides
have it, kept at its initial value when the source lacks it, and left out when the model does;
and the routers of upcycled blocks, which a dense model does not have; and every tensor of a
modality the source holds nothing of (PolyViT's and ImageBind's practice: an image-text model
seeds an image-text-audio one, whose audio embedder, pooling head, projection and positions start
as the new model initialised them, named in the log). With `train.init_audio_patches_from_image`
the audio patch convolution starts from the image one instead, as AST starts from ImageNet; with
`train.init_video_from_image` every video tensor starts from its image counterpart, as ViViT
starts from an image model (`video_from_image`). A
workdir's training-only heads (pretraining's decoder and fusion blocks) are never read: only the
model's entries are.

`check_init_from` makes these checks from the source's names and shapes alone, before the
workdir is touched; `warm_start` loads the values into each rank's model. Experts are matched by
global index, so a model sharded over expert-parallel ranks takes its own experts from a source
that holds all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor

from limoe.checkpoints.legacy import current_model_state
from limoe.checkpoints.model_file import embedded_config, format_version, read_model_file, read_model_metadata
from limoe.checkpoints.training import checkpoint_at, checkpoint_config, consolidated_state
from limoe.config import Config
from limoe.config.video import VideoConfig
from limoe.distributed import rank_and_world
from limoe.errors import LimoeError
from limoe.model.moe import EXPERT_PARAMETERS, MoeMlp
from limoe.model.tower import Limoe, build_model

log = logging.getLogger(__name__)
LOSS_PARAMETERS = ("logit_bias",)  # exists only under the loss that uses it (SigLIP)
IMAGE_PATCHES, AUDIO_PATCHES = "embedders.image.patch_embed.", "embedders.audio.patch_embed."


def _source(init_from: str) -> Path:
    source = Path(init_from)
    if not source.exists():
        raise LimoeError(f"train.init_from {source} does not exist; give an exported .safetensors file or a workdir.")
    return source


def source_shapes_as_meta(source: Path) -> dict[str, Tensor]:
    """The model tensors `source` holds as `meta` tensors: names and shapes, no values read."""
    if source.is_dir():
        try:
            config = checkpoint_config(checkpoint_at(source))
        except LimoeError as error:
            raise LimoeError(f"train.init_from: {error}") from None
        with torch.device("meta"):
            return build_model(config).state_dict()
    try:
        metadata = read_model_metadata(source)
        embedded_config(metadata, source)  # what `warm_start` reads the file with needs it
        version = format_version(metadata, source)
    except LimoeError as error:
        raise LimoeError(f"train.init_from: {error}") from None
    try:
        with safe_open(str(source), framework="pt") as handle:
            stored = {name: torch.empty(handle.get_slice(name).get_shape(), device="meta") for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise LimoeError(f"train.init_from {source} is not a readable safetensors file ({error}).") from None
    return current_model_state(stored, version)  # files of any format version


def _skeleton(config: Config) -> Limoe:
    """The unsharded model `config` describes, on the `meta` device: names and shapes, no values."""
    with torch.device("meta"):
        return build_model(config)


def fresh_modalities(model: Limoe, source_names: Iterable[str]) -> dict[str, list[str]]:
    """Each modality of `model` of which the source (the names of its tensors) holds no tensor at
    all, with the names of that modality's own tensors: they start as `model` initialised them. A
    modality the source holds some of its tensors of is no candidate: a gap there is an error."""
    held, names = set(source_names), list(model.state_dict())
    fresh = {}
    for modality in model.config.modalities:
        prefixes = tuple(model.modality_parts(modality))
        own = [name for name in names if name.startswith(prefixes)]
        if held.isdisjoint(own):
            fresh[modality] = own
    return fresh


def _check_fits(source: Path, shapes: dict[str, torch.Size], config: Config,
                upcycled: list[int]) -> dict[str, list[str]]:
    """One line naming the first tensor of the model `config` describes that `source` lacks or
    holds in another shape, or the first tensor of `source` the model does not have (`shapes` as
    upcycled; the routers of the `upcycled` blocks start fresh); else the modalities that start
    fresh (`fresh_modalities`)."""
    architecture = f"{config.model.name} (width {config.model.width}, depth {config.model.depth})"
    skeleton = _skeleton(config)
    wanted = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    modalities = fresh_modalities(skeleton, shapes)
    fresh = set(LOSS_PARAMETERS) | {f"{_mlp(block)}router_weight" for block in upcycled}
    fresh.update(name for names in modalities.values() for name in names)
    for name, shape in wanted.items():
        if name not in shapes and name not in fresh:
            raise LimoeError(f"train.init_from {source} has no tensor {name}, which the {architecture} model needs; "
                             f"start from a model of the same architecture.")
        if name in shapes and shapes[name] != shape:
            raise LimoeError(f"train.init_from {source}: tensor {name} has shape {tuple(shapes[name])}, the "
                             f"{architecture} model's is {tuple(shape)}; start from a model of the same architecture.")
    unknown = sorted(set(shapes) - set(wanted) - set(LOSS_PARAMETERS))
    if unknown:
        raise LimoeError(f"train.init_from {source} holds tensor {unknown[0]}, which the {architecture} model does "
                         f"not have; it was saved from another architecture.")
    if config.train.init_video_from_image:
        if "video" not in modalities:
            raise LimoeError(f"train.init_video_from_image: train.init_from {source} has video tensors of its own, "
                             f"which are loaded; drop the option.")
        # the image counterparts are there: the model has image (`Config` checks), so the source holds all of it
    if config.train.init_audio_patches_from_image:
        if "audio" not in modalities:
            raise LimoeError(f"train.init_audio_patches_from_image: train.init_from {source} has audio tensors of its "
                             f"own, which are loaded; drop the option.")
        if f"{IMAGE_PATCHES}weight" not in shapes:
            raise LimoeError(f"train.init_audio_patches_from_image: train.init_from {source} has no image patch "
                             f"convolution to start the audio one from; drop the option.")
    return modalities


def audio_patches_from_image(state: dict[str, Tensor], patch_size: int) -> dict[str, Tensor]:
    """The audio patch convolution as AST (Gong et al. 2021) starts it from an ImageNet ViT: the
    image kernel summed over its RGB channels, so that a spectrogram patch is embedded as the image
    model embeds the grey image with that patch in all three channels, and the image bias; the
    kernel resized bilinearly (no antialiasing) when the audio patch side differs."""
    kernel = state[f"{IMAGE_PATCHES}weight"].sum(dim=1, keepdim=True)  # [d, 3, p_i, p_i] → [d, 1, p_i, p_i]
    if kernel.shape[-1] != patch_size:
        kernel = F.interpolate(kernel, size=(patch_size, patch_size), mode="bilinear",
                               align_corners=False)  # [d, 1, p_a, p_a]
    return {f"{AUDIO_PATCHES}weight": kernel, f"{AUDIO_PATCHES}bias": state[f"{IMAGE_PATCHES}bias"]}


VIDEO_ONLY = ("video_temporal_positions",)  # video tensors without an image counterpart: they start at zero


def image_counterpart(video_name: str) -> str:
    """The image tensor a video tensor starts from: `embedders.video.…` ← `embedders.image.…`,
    `video_positions` ← `image_positions`, `blocks.0.video.…` ← `blocks.0.image.…`, and so on."""
    return video_name.replace("video", "image", 1)


def central_frame_kernel(image_kernel: Tensor, tubelet_frames: int) -> Tensor:
    """[d, 3, p, p] → [d, 3, t, p, p]: the image kernel in frame t // 2 of the tubelet, zeros in the
    others (ViViT's central-frame initialisation; for even t the later of the two middle frames).
    A tubelet of t equal frames then embeds as the image kernel embeds one of them."""
    kernel = image_kernel.new_zeros(image_kernel.shape[:2] + (tubelet_frames,) + image_kernel.shape[2:])
    kernel[:, :, tubelet_frames // 2] = image_kernel
    return kernel


def video_from_image(state: dict[str, Tensor], video_names: Iterable[str], video: VideoConfig) -> dict[str, Tensor]:
    """Each of `video_names` (the video tensors of the model) from `state`'s image counterpart: the
    tubelet kernel by `central_frame_kernel`; joint positions [T/t · Np, d] the image's [Np, d]
    tiled over the T/t tubelet steps, separable ones the image's with the temporal table [T/t, d]
    zero; every other tensor (bias, class token, pooling head, projection, adapter blocks) a copy.
    So a clip of one frame repeated gives the tokens of that frame's image, once per tubelet step."""
    result = {}
    for name in video_names:
        if name in VIDEO_ONLY:
            result[name] = state["image_positions"].new_zeros(video.steps, state["image_positions"].shape[-1])
            continue
        image = state[image_counterpart(name)]
        if name == "embedders.video.patch_embed.weight":
            result[name] = central_frame_kernel(image, video.tubelet_frames)
        elif name == "video_positions" and video.positions == "joint":
            result[name] = image.repeat(video.steps, 1)  # [T/t · Np, d], time-major
        else:
            result[name] = image
    return result


def _fresh_line(model: Limoe, modalities: dict[str, list[str]], patches_from_image: bool,
                video_from_image: bool) -> str:
    """'audio embedder, pooling head, projection, positions': the parts of each fresh modality, and
    where they start from when not as initialised."""
    described = []
    for modality, names in modalities.items():
        parts = [part for prefix, part in model.modality_parts(modality).items()
                 if any(name.startswith(prefix) for name in names)]
        if modality == "audio" and patches_from_image:
            parts[parts.index("embedder")] = "embedder (its patch convolution from the image one, summed over RGB)"
        described.append(f"{modality} {', '.join(dict.fromkeys(parts))}")
        if modality == "video" and video_from_image:
            described[-1] += " (from the image ones: tubelet kernel in the central frame, positions tiled over time)"
    return f"; fresh (not in the source): {'; '.join(described)}" if described else ""


def check_init_from(config: Config) -> None:
    """Refuse a `train.init_from` that cannot seed this run, in one line, reading names and shapes only."""
    if config.train.init_from is not None:
        source = _source(config.train.init_from)
        stored = source_shapes_as_meta(source)
        shapes = {name: tensor.shape for name, tensor in upcycled(stored, config).items()}
        _check_fits(source, shapes, config, upcycled_blocks(stored, config))


def _mlp(block: int) -> str:
    return f"blocks.{block}.mlp."


def upcycled_blocks(state: dict, config: Config) -> list[int]:
    """The MoE blocks of `config` whose MLP `state` holds as one dense MLP (its dense twin's)."""
    return [block for block in config.model.moe_layers
            if f"{_mlp(block)}fc1.weight" in state and f"{_mlp(block)}fc1_weight" not in state]


def upcycled(state: dict, config: Config) -> dict:
    """Sparse upcycling (Komatsuzaki et al. 2022): `state` with the dense MLP of every block that
    is an MoE block in `config` copied into each of its E experts, as the stacked expert tensors
    [E, ...]; the router, absent from a dense model, keeps its fresh initialisation. The copies
    are identical; what tells them apart is the fresh router sending them different tokens (with
    router noise in training), as in the paper. Other entries pass through unchanged."""
    result = dict(state)
    experts = config.model.moe.num_experts
    for block in upcycled_blocks(state, config):
        for linear in ("fc1", "fc2"):
            for kind in ("weight", "bias"):
                dense = result.pop(f"{_mlp(block)}{linear}.{kind}")  # fc1 [h, d], fc2 [d, h], biases [h] / [d]
                result[f"{_mlp(block)}{linear}_{kind}"] = dense.unsqueeze(0).expand(experts, *dense.shape)  # [E, ...]
    return result


def _read_source(source: Path) -> dict[str, Tensor]:
    """The model tensors of an exported file or a workdir's newest checkpoint, unsharded names."""
    return consolidated_state(source)[0] if source.is_dir() else read_model_file(source)[0]


def _local_values(model: Limoe, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` (the unsharded model's tensors) under this rank's `model.state_dict()` names, each
    MoE layer's stacked expert tensors cut to this rank's experts by the layer itself."""
    values = {name: state[name] for name in model.state_dict() if name in state}
    for prefix, layer in model.named_modules():
        if isinstance(layer, MoeMlp):
            for parameter in EXPERT_PARAMETERS:
                name = f"{prefix}.{parameter}"
                values[name] = layer.local_experts_of(state[name])
    return values


def warm_start(model: Limoe, config: Config) -> int:
    """Load the weights of `config.train.init_from` (exported file or workdir) into `model`, this
    rank's part of the model `config` describes, in place; returns the number of tensors loaded."""
    source = _source(config.train.init_from)
    stored = _read_source(source)
    blocks = upcycled_blocks(stored, config)
    state = upcycled(stored, config)
    modalities = _check_fits(source, {name: tensor.shape for name, tensor in state.items()}, config, blocks)
    patches_from_image = config.train.init_audio_patches_from_image
    if patches_from_image:
        state.update(audio_patches_from_image(state, config.model.audio.patch_size))
    if config.train.init_video_from_image:
        state.update(video_from_image(state, modalities["video"], config.model.video))
    values = _local_values(model, state)
    model.load_state_dict(values, strict=False)  # only loss parameters, upcycled routers and fresh modalities may be absent
    if rank_and_world()[0] == 0:
        fresh = {name for names in modalities.values() for name in names}
        kept = [name for name in model.state_dict() if name not in values and name not in fresh]
        log.warning("started from %s: %d tensors loaded%s%s%s", source, len(values),
                    f"; blocks {blocks} upcycled from the dense MLP (experts copied, routers fresh)" if blocks else "",
                    _fresh_line(model, modalities, patches_from_image, config.train.init_video_from_image),
                    f"; {', '.join(kept)} kept at the initial value" if kept else "")
    return len(values)
