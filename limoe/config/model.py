"""`model`: the architecture of the single tower (what `configs/models/*.yaml` hold)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from limoe.config.audio import AudioConfig
from limoe.config.keys import setting
from limoe.config.moe import MoeConfig
from limoe.config.video import VideoConfig
from limoe.errors import LimoeError
from limoe.modalities import DEFAULT_MODALITIES, MODALITIES


@dataclass(frozen=True)
class ModelConfig:
    """A single-tower transformer over its modalities: ViT sizes, text, audio, video, pooling and where the experts sit."""

    name: str = setting("custom", "the architecture's name, shown in reports and model cards")
    modalities: tuple[str, ...] = setting(
        DEFAULT_MODALITIES, f"the modalities this model embeds (of {', '.join(MODALITIES)}), kept in that order; a "
        "modality's id in the MoE layers and routing statistics is its place here")
    image_size: int = setting(224, "input images are image_size × image_size pixels", "[1, inf)")
    patch_size: int = setting(32, "side of the square image patches; must divide image_size", "[1, inf)")
    width: int = setting(768, "token width d of the tower", "[1, inf)")
    depth: int = setting(12, "transformer blocks", "[1, inf)")
    heads: int = setting(12, "attention heads; must divide width", "[1, inf)")
    mlp_dim: int = setting(3072, "hidden width of each MLP and each expert", "[1, inf)")
    embed_dim: int = setting(512, "width of the joint image-text embedding space", "[1, inf)")
    vocab_size: int = setting(49408, "token embedding rows (open_clip's BPE vocabulary has 49408)", "[1, inf)")
    context_length: int = setting(16, "caption tokens, start and end of text included", "[2, inf)")
    image_pool: Literal["map", "cls", "mean"] = setting("map", "image pooling: map = attention pooling with a "
                                                               "learned probe, cls token, or mean")
    text_pool: Literal["map", "cls", "mean", "eos"] = setting("map", "text pooling; eos: the end-of-text token")
    dense: bool = setting(False, "true: the MoE blocks become dense MLPs (the dense baseline)")
    modality_adapter_layers: int = setting(0, "PolyViT's L_adapt: the first N blocks are modality-specific (one "
                                              "dense copy per modality), the rest shared", "[0, inf)")
    moe: MoeConfig = field(default_factory=MoeConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self):
        unknown = [name for name in self.modalities if name not in MODALITIES]
        if unknown:
            raise LimoeError(f"model.modalities names '{unknown[0]}', which is not a modality; use some of "
                             f"{', '.join(MODALITIES)}.")
        if not self.modalities or len(set(self.modalities)) < len(self.modalities):
            raise LimoeError(f"model.modalities must name each modality at most once and at least one, got "
                             f"{list(self.modalities)}.")
        # registry order, whatever order they were written in: it fixes ids, weights and the joint sequence
        object.__setattr__(self, "modalities", tuple(sorted(self.modalities, key=MODALITIES.index)))
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
        if self.modality_adapter_layers > self.depth:
            raise LimoeError(
                f"model.modality_adapter_layers {self.modality_adapter_layers} must be between 0 and the depth "
                f"{self.depth}."
            )
        adapters_with_experts = [i for i in self.moe_layers if i < self.modality_adapter_layers]
        if adapters_with_experts:
            raise LimoeError(
                f"model.modality_adapter_layers {self.modality_adapter_layers} makes MoE block "
                f"{adapters_with_experts[0]} modality-specific, but an adapter block may not be a MoE block; "
                f"lower modality_adapter_layers or move model.moe.layers past it."
            )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of blocks whose MLP is a mixture of experts (none for the dense twin)."""
        return () if self.dense else self.moe.layers

    def modality_id(self, name: str) -> int:
        """A modality's id in this model: its place in `modalities` (what its tokens carry into the MoE layers)."""
        return self.modalities.index(name)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def video_tokens(self) -> int:
        """Tokens of one video clip: (model.video.frames / t) tubelet steps of num_patches each."""
        return self.video.steps * self.num_patches
