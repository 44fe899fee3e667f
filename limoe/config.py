"""Typed, frozen configuration: what every other module reads.

YAML files under `configs/` are parsed into these dataclasses. Parsing is strict on purpose: an
unknown key or a value of the wrong type is an error naming the key's dotted path, because a typo
in a config silently falling back to a default can waste a week of GPU time.

A training config names its model by reference (`model: limoe-b16`, a file in `configs/models/`)
or as a mapping with `base:` plus the keys it changes, so architectures are written down once.
`--set a.b=v` overrides are parsed as YAML scalars and go through the same type checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from limoe.errors import LimoeError



def _config_dir() -> Path:
    """The shipped configs: `limoe.configs` when installed (a wheel, or an editable install, which
    maps it to the checkout's `configs/`), else the `configs/` beside this package in a checkout."""
    try:
        return Path(str(importlib.resources.files("limoe.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()
# YAML 1.1 (PyYAML) reads `1e-3` and `1.0e30` as strings; for float keys they mean the number.
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class PerModality:
    """One number per modality (loss weights, entropy thresholds)."""

    image: float
    text: float

    def __getitem__(self, modality: str) -> float:
        return getattr(self, modality)


@dataclass(frozen=True)
class MoeConfig:
    """Sparse expert layers: where they sit and how tokens are routed to them.

    `layers` is resolved to explicit block indices; YAML may write `every 2` (blocks 1, 3, 5, …)
    or `last N` (the last N of those), as V-MoE does.
    """

    num_experts: int = 8
    layers: tuple[int, ...] = ()
    top_k: int = 1
    group_size: int = 8  # examples per routing group; their image and text tokens compete together
    train_capacity_factor: float = 1.05
    eval_capacity_factor: Optional[float] = 2.0  # None: dropless (capacity = group size)
    batch_priority: bool = True
    router_noise: bool = True  # N(0, (1/E)^2) on the logits, training only
    backend: Literal["auto", "torch", "triton"] = "auto"  # auto: Triton on CUDA, the reference elsewhere


@dataclass(frozen=True)
class ModelConfig:
    """A single-tower image-text transformer (ViT sizes; DESIGN: S/32 has 8 layers)."""

    name: str = "custom"
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    embed_dim: int = 512  # joint image-text embedding space
    vocab_size: int = 49408  # open_clip's BPE vocabulary
    context_length: int = 16
    image_pool: Literal["map", "cls", "mean"] = "map"  # MAP: attention pooling with a learned probe
    text_pool: Literal["map", "cls", "mean", "eos"] = "map"  # eos: the end-of-text token
    dense: bool = False  # True: the MoE blocks become dense MLPs (the dense baseline)
    moe: MoeConfig = field(default_factory=MoeConfig)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise LimoeError(
                f"model.image_size {self.image_size} is not a multiple of model.patch_size "
                f"{self.patch_size}; pick sizes that divide evenly."
            )
        if self.width % self.heads:
            raise LimoeError(f"model.width {self.width} is not divisible by model.heads {self.heads}.")
        for index in self.moe.layers:
            if not 0 <= index < self.depth:
                raise LimoeError(
                    f"model.moe.layers: block index {index} is beyond the model's depth "
                    f"{self.depth}; use indices 0..{self.depth - 1}."
                )
        if self.moe.top_k != 1:
            raise LimoeError("model.moe.top_k: only top-1 routing is implemented; set it to 1.")
        if self.moe.num_experts < 1 or self.moe.group_size < 1:
            raise LimoeError("model.moe.num_experts and model.moe.group_size must be at least 1.")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of blocks whose MLP is a mixture of experts (none for the dense twin)."""
        return () if self.dense else self.moe.layers

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LossConfig:
    """Contrastive loss and the V-MoE / LIMoE auxiliary losses (weights and thresholds)."""

    contrastive: Literal["clip", "siglip"] = "clip"
    logit_scale_init: float = math.log(10.0)
    importance: float = 0.005
    load: float = 0.005
    local_entropy: PerModality = PerModality(image=0.01, text=0.01)
    global_entropy: PerModality = PerModality(image=0.01, text=0.01)
    # S_m: the global entropy loss is off once a modality's marginal routing entropy reaches log S_m.
    global_entropy_min_experts: PerModality = PerModality(image=8.0, text=3.0)
    router_z: float = 0.0


@dataclass(frozen=True)
class ShardSource:
    """A set of webdataset shards and its sampling weight when mixed with others."""

    shards: str
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    train: tuple[ShardSource, ...] = (ShardSource("data_shards/train"),)
    heldout: str = "data_shards/heldout"
    workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = True
    max_bad_fraction: float = 0.01


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 10_000
    schedule: Literal["cosine", "linear"] = "linear"
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 16_384  # global, across all data-parallel ranks
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    routing_stats_every: int = 500
    skip_nonfinite_steps: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Weights to start from when the workdir has no checkpoint of its own: an exported .safetensors
    # file or a training workdir of the same architecture (e.g. `limoe pretrain`'s). Optimizer and
    # step start fresh.
    init_from: Optional[str] = None
    # FLIP: drop this fraction of each image's patches before the tower (0: off), except in the
    # last `unmasked_steps` steps. Evaluation never masks.
    image_mask_ratio: float = 0.0
    unmasked_steps: int = 0

    def __post_init__(self):
        _check_mask_ratio(self.image_mask_ratio, "train.image_mask_ratio")
        if not 0 <= self.unmasked_steps <= self.steps:
            raise LimoeError(f"train.unmasked_steps {self.unmasked_steps} must be between 0 and train.steps {self.steps}.")


@dataclass(frozen=True)
class PretrainConfig:
    """`limoe pretrain`: OmniVec2's masked stages, unimodal then bimodal (see docs/TRAINING.md).

    The run takes `unimodal_steps + bimodal_steps` steps, which must equal `train.steps`. The
    defaults are MAE's (image) and BERT's (text); OmniVec2 published no ratios.
    """

    unimodal_steps: int = 50_000  # masked image modelling alternating with masked language modelling
    bimodal_steps: int = 50_000  # the same, each given the other modality through cross-attention fusion
    image_mask_ratio: float = 0.75  # MAE: fraction of patches hidden from the encoder
    text_mask_ratio: float = 0.15  # BERT: fraction of caption tokens predicted
    text_replace_with_mask: float = 0.8  # BERT: of the predicted tokens, replaced by the learned mask embedding
    text_replace_with_random: float = 0.1  # … by a random token; the rest stay unchanged
    decoder_width: int = 512  # MAE's ViT-L decoder: 8 blocks of width 512, 16 heads
    decoder_depth: int = 8
    decoder_heads: int = 16
    fusion_depth: int = 1  # cross-attention blocks per direction, training only
    image_loss_weight: float = 1.0
    text_loss_weight: float = 1.0

    def __post_init__(self):
        _check_mask_ratio(self.image_mask_ratio, "pretrain.image_mask_ratio")
        if not 0 < self.text_mask_ratio < 1:
            raise LimoeError(f"pretrain.text_mask_ratio {self.text_mask_ratio} must be between 0 and 1 (BERT: 0.15).")
        shares = (self.text_replace_with_mask, self.text_replace_with_random)
        if min(shares) < 0 or sum(shares) > 1:
            raise LimoeError(
                "pretrain.text_replace_with_mask and pretrain.text_replace_with_random are shares of the masked tokens: "
                "each at least 0 and together at most 1 (BERT: 0.8 and 0.1)."
            )
        if min(self.unimodal_steps, self.bimodal_steps) < 0:
            raise LimoeError("pretrain.unimodal_steps and pretrain.bimodal_steps must be at least 0.")
        if self.decoder_width % self.decoder_heads:
            raise LimoeError(
                f"pretrain.decoder_width {self.decoder_width} is not divisible by pretrain.decoder_heads {self.decoder_heads}."
            )


def _check_mask_ratio(ratio: float, key: str) -> None:
    if not 0 <= ratio < 1:
        raise LimoeError(f"{key} {ratio} must be at least 0 and below 1: it is the share of patches dropped.")


@dataclass(frozen=True)
class DistributedConfig:
    expert_parallel_size: int = 1
    zero_stage: int = 0
    timeout_minutes: int = 30


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


# ---------------------------------------------------------------------------------------------
# MoE placement helpers


def every_n_layers(depth: int, n: int = 2) -> tuple[int, ...]:
    """Blocks n-1, 2n-1, … (0-based): V-MoE's "every 2" puts experts in blocks 1, 3, 5, …"""
    return tuple(range(n - 1, depth, n))


def last_n_layers(depth: int, count: int, every: int = 2) -> tuple[int, ...]:
    """The last `count` of the every-`every` positions (V-MoE's "last N")."""
    positions = every_n_layers(depth, every)
    if count > len(positions):
        raise LimoeError(
            f"model.moe.layers: 'last {count}' asks for more MoE blocks than the {len(positions)} "
            f"'every {every}' positions of a depth-{depth} model."
        )
    return positions[len(positions) - count :]


def _resolve_layer_spec(spec: Any, depth: int) -> Any:
    """Turn `every N` / `last N` into explicit indices; leave lists to the type check."""
    if not isinstance(spec, str):
        return spec
    words = spec.split()
    if len(words) == 2 and words[1].isdigit() and words[0] in ("every", "last"):
        number = int(words[1])
        return list(every_n_layers(depth, number) if words[0] == "every" else last_n_layers(depth, number))
    raise LimoeError(
        f"model.moe.layers: cannot read {spec!r}; write a list of block indices, 'every 2' or 'last 12'."
    )


# ---------------------------------------------------------------------------------------------
# Strict conversion between plain mappings and the dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and build dataclasses; errors name `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, path)
    if origin is Literal:
        if value not in args:
            raise LimoeError(f"config key '{path}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]  # a scalar is a 1-list
        return tuple(_convert(item, args[0], f"{path}[{i}]") for i, item in enumerate(items))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is ShardSource:
            value = {"shards": value}
        if not isinstance(value, dict):
            raise LimoeError(f"config key '{path}' must be a mapping, got {value!r}.")
        return from_dict(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
        return float(value)
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise LimoeError(
        f"config key '{path}' must be of type {_type_name(tp)}, got {value!r} ({type(value).__name__})."
    )


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise LimoeError(f"unknown config key '{dotted}'{hint}.")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """The inverse of `from_dict`: plain YAML-safe types (tuples become lists)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


# ---------------------------------------------------------------------------------------------
# Files, references and overrides


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LimoeError(f"config file {path} does not exist; check the path.") from None
    except yaml.YAMLError as error:
        raise LimoeError(f"config file {path} is not valid YAML: {error}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LimoeError(f"config file {path} must hold a mapping of keys at the top level.")
    return data


def find_config(name_or_path: str, kind: str) -> Path:
    """A config file given by path, or by name under `configs/<kind>/` (e.g. `limoe-b16`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise LimoeError(f"config file {path} does not exist; check the path.")
        return path
    candidate = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
    raise LimoeError(f"no {kind} config named '{name_or_path}'; known: {', '.join(known)}, or give a .yaml path.")


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_base(raw: dict, kind: str) -> dict:
    """A mapping with `base: name` is that config file's mapping updated by the other keys."""
    if "base" not in raw:
        return raw
    raw = dict(raw)
    base = _with_base(_read_yaml(find_config(str(raw.pop("base")), kind)), kind)
    return _deep_merge(base, raw)


def _resolve_model_mapping(raw: Any) -> dict:
    """A model given by name, or as `{base: name, ...changes}`, becomes a full mapping."""
    if isinstance(raw, str):
        raw = {"base": raw}
    if not isinstance(raw, dict):
        raise LimoeError(f"config key 'model' must be a model name or a mapping, got {raw!r}.")
    return _with_base(raw, "models")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a', 'b', 'c'], value parsed as a YAML scalar or list)."""
    if "=" not in text:
        raise LimoeError(f"--set {text!r}: write overrides as key.path=value, e.g. train.steps=100.")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _apply_override(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            section = ".".join(keys[: i + 1])
            raise LimoeError(f"--set {'.'.join(keys)}: '{section}' is not a section of the config.")
        node = child
    node[keys[-1]] = value


def _finish_model_mapping(raw: dict) -> dict:
    """Resolve references and `every N` / `last N` layer specs inside a model mapping."""
    model = _resolve_model_mapping(raw)
    moe = model.get("moe")
    if isinstance(moe, dict) and "layers" in moe:
        depth = model.get("depth", ModelConfig.depth)
        model["moe"] = {**moe, "layers": _resolve_layer_spec(moe["layers"], depth)}
    return model


def load_model_config(name_or_path: str, overrides: list[str] = ()) -> ModelConfig:
    """A model architecture by name (`limoe-h14`) or path, with `key=value` overrides."""
    raw = _resolve_model_mapping(_read_yaml(find_config(name_or_path, "models")))
    for keys, value in map(parse_override, overrides):
        _apply_override(raw, keys[1:] if keys[0] == "model" else keys, value)
    return from_dict(ModelConfig, _finish_model_mapping(raw), "model")


def load_config(name_or_path: Optional[str] = None, overrides: list[str] = (), kind: str = "train") -> Config:
    """A full run config (default `configs/<kind>/demo.yaml`) with `a.b=value` overrides.

    `kind` is where a name is looked up (`train` or `pretrain`); a `base:` always names a
    training recipe, so a pretraining config states only what it changes.
    """
    raw = _with_base(_read_yaml(find_config(name_or_path or "demo", kind)), "train")
    if "model" in raw:
        raw["model"] = _resolve_model_mapping(raw["model"])
    for keys, value in map(parse_override, overrides):
        _apply_override(raw, keys, value)
    if "model" in raw:
        raw["model"] = _finish_model_mapping(raw["model"])
    return from_dict(Config, raw)


def config_from_dict(data: dict) -> Config:
    """Rebuild a saved (already resolved) config, e.g. the one stored in a checkpoint."""
    return from_dict(Config, data)


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
