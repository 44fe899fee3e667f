"""LIMoE: one transformer tower for images and text (and audio, video), with sparse top-1 expert MLPs.

Read top to bottom: the embeddings are per modality (the embedder of each of the model's
modalities, `model.modalities`, from `limoe.modalities`: patches + 2-D positions, tokens + 1-D
positions, spectrogram patches + positions, tubelets + spatio-temporal positions); the blocks run
on one joint sequence per example (image tokens, then text tokens, then audio tokens, then video
tokens, one residual tensor); every block weight,
routers included, is shared, except in the first
`modality_adapter_layers` blocks (PolyViT's L_adapt), which come as one copy per modality;
attention runs over each example's own tokens of one modality; in an MoE block an example's
patches and caption tokens are routed together in one call, tagged by modality; per-modality
pooling heads and projections map into the joint space, where embeddings are L2-normalised.

Inside, a batch travels as a mapping by modality name (`{"image": images, "text": tokens}`) and
every per-modality module sits in an `nn.ModuleDict` keyed by that name; the public interface
is open_clip's (`forward(images, tokens)`, `encode_image`, `encode_text`, `logit_scale`), with
`encode_audio` and `encode_video` beside them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from limoe.config import Config, ModelConfig
from limoe.distributed import ExpertSharding
from limoe.errors import LimoeError
from limoe.modalities import modality
from limoe.modalities.text import PAD_TOKEN  # noqa: F401  (re-exported: the padding id the model reads)
from limoe.modalities.tokens import Tokens
from limoe.model.layers import Attention, Mlp, Pool, Segment
from limoe.model.moe import MoeMlp
from limoe.model.routing import LayerRouting


@dataclass(frozen=True)
class TokenLayout:
    """Where each modality's tokens sit in the joint sequence the blocks run on."""

    modality: Tensor  # [B, N] modality id per token (its place in model.modalities), PADDING where padded
    segments: tuple[Segment, ...]  # one per modality stream, in the model's order; attention stays inside each
    names: tuple[str, ...]  # each segment's modality name

    @classmethod
    def of(cls, streams: list[Tokens]) -> "TokenLayout":
        """The layout of `streams` joined in the order given (the tower gives the model's order)."""
        starts = [0]
        for stream in streams:
            starts.append(starts[-1] + stream.x.shape[1])
        modality = streams[0].modality if len(streams) == 1 else torch.cat([s.modality for s in streams], dim=1)
        return cls(modality, tuple(Segment(start, s.x.shape[1], s.key_mask) for start, s in zip(starts, streams)),
                   tuple(s.name for s in streams))

    def alone(self, index: int) -> "TokenLayout":
        """Segment `index` as a sequence of its own."""
        segment = self.segments[index]
        modality = self.modality[:, segment.start: segment.start + segment.length]  # [B, n]
        return TokenLayout(modality, (Segment(0, segment.length, segment.key_mask),), (self.names[index],))


class LimoeOutput(tuple):
    """What `model(images, tokens)` returns: open_clip's output tuple, which also names its fields and
    carries the routing records the auxiliary losses are computed from.

    As open_clip's CLIP.forward: `image_features, text_features, logit_scale = model(images, tokens)`,
    with `logit_bias` as a fourth element for a SigLIP model, so open_clip's losses take it
    (`ClipLoss()(*output)`). `output.routing` holds one `LayerRouting` per MoE block, in depth order.
    With `model.output_dict = True` the model returns `as_dict()` instead, open_clip's dict.
    """

    routing: list[LayerRouting]

    def __new__(cls, image_features: Optional[Tensor], text_features: Optional[Tensor], logit_scale: Tensor,
                logit_bias: Optional[Tensor], routing: list[LayerRouting]) -> "LimoeOutput":
        fields = (image_features, text_features, logit_scale) + (() if logit_bias is None else (logit_bias,))
        output = super().__new__(cls, fields)
        output.routing = routing
        return output

    def __reduce__(self):  # copy and pickle rebuild it with the routing, not from the tuple alone
        return LimoeOutput, (*self[:3], self.logit_bias, self.routing)

    @property
    def image_features(self) -> Optional[Tensor]:
        """[B, D] L2-normalised (None when no images were given)."""
        return self[0]

    @property
    def text_features(self) -> Optional[Tensor]:
        """[B', D] L2-normalised (None when no texts were given)."""
        return self[1]

    @property
    def logit_scale(self) -> Tensor:
        """[1] the temperature exp(model.logit_scale) that multiplies the cosine logits."""
        return self[2]

    @property
    def logit_bias(self) -> Optional[Tensor]:
        """[1] SigLIP's learned logit bias (None for the CLIP loss)."""
        return self[3] if len(self) > 3 else None

    def as_dict(self) -> dict[str, Tensor]:
        """open_clip's output dict: the features and logit_scale, and logit_bias if the model has one.
        It holds nothing else, so open_clip's losses take it whole (`loss(**output)`)."""
        names = ("image_features", "text_features", "logit_scale", "logit_bias")
        return dict(zip(names, self))


class Block(nn.Module):
    """Pre-LN transformer block: x += Attn(LN(x)); x += MLP(LN(x)), the MLP dense or MoE.

    x holds every modality's tokens in one residual tensor; attention runs per segment, and the
    MLP (or the MoE layer, which routes an example's patches and caption tokens together) over all.
    """

    def __init__(self, config: ModelConfig, sparse: bool, sharding: ExpertSharding):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attention = Attention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width)
        if sparse:
            self.mlp = MoeMlp(config.width, config.mlp_dim, config.moe, sharding, len(config.modalities))
        else:
            self.mlp = Mlp(config.width, config.mlp_dim)

    @property
    def sparse(self) -> bool:
        return isinstance(self.mlp, MoeMlp)

    def forward(self, x: Tensor, layout: TokenLayout) -> tuple[Tensor, Optional[LayerRouting]]:
        """x [B, N, d] → [B, N, d], and the routing record of an MoE block (None for a dense one)."""
        x = x + self.attention(self.norm1(x), layout.segments)
        if not self.sparse:
            return x + self.mlp(self.norm2(x)), None
        y, routing = self.mlp(self.norm2(x), layout.modality)
        return x + y, routing


class ModalityAdapter(nn.ModuleDict):
    """A modality-specific tower position (PolyViT's L_adapt): one dense Block per modality, and each
    stream goes through its own modality's copy. Called like a Block; it never routes."""

    sparse = False

    def __init__(self, config: ModelConfig):
        super().__init__({name: Block(config, False, ExpertSharding()) for name in config.modalities})

    def forward(self, x: Tensor, layout: TokenLayout) -> tuple[Tensor, None]:
        """x [B, N, d] → [B, N, d]: each modality's segment through that modality's block."""
        parts = [self[name](x[:, segment.start: segment.start + segment.length], layout.alone(index))[0]
                 for index, (name, segment) in enumerate(zip(layout.names, layout.segments))]  # [B, n_s, d] each
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


class Limoe(nn.Module):
    """The single-tower contrastive model, with open_clip's `encode_image` / `encode_text` interface.

    With expert parallelism (`sharding.size` = ep > 1) each MoE block holds this rank's E / ep
    experts; the weights are the same as the unsharded model's for the same seed.

    As in open_clip, the learned scalars of the contrastive loss are the model's: `logit_scale`
    (the log-temperature) and, for SigLIP, `logit_bias`, so they are saved and exported with it;
    and `output_dict` (open_clip's attribute, False by default) picks what `forward` returns.
    """

    output_dict: bool = False

    def __init__(self, config: ModelConfig, logit_scale_init: float = math.log(10.0),
                 logit_bias_init: Optional[float] = None, sharding: ExpertSharding = ExpertSharding()):
        super().__init__()
        self.config = config
        width = config.width
        # Built (and their random numbers drawn) for the model's modalities in registry order, then the
        # blocks, then the heads: the order fixes which weights a seed gives (audio's come after image's
        # and text's, so adding it leaves theirs as they were).
        self.embedders = nn.ModuleDict()
        self.embedder_parameters: dict[str, tuple[str, ...]] = {}  # modality → the keys of its parameters here
        for name in config.modalities:
            embedder = self.embedders[name] = modality(name).embedder(config)
            held = embedder.tower_parameters(config)
            for key, parameter in held.items():
                self.register_parameter(f"{name}_{key}", parameter)
            self.embedder_parameters[name] = tuple(held)
        moe_layers = set(config.moe_layers)
        self.blocks = nn.ModuleList(
            ModalityAdapter(config) if i < config.modality_adapter_layers else Block(config, i in moe_layers, sharding)
            for i in range(config.depth)
        )
        self.norm = nn.LayerNorm(width)
        self.pools = nn.ModuleDict({name: Pool(modality(name).pool(config), width, config.heads, config.mlp_dim)
                                    for name in config.modalities})
        self.projections = nn.ModuleDict(
            {name: nn.Linear(width, config.embed_dim, bias=False) for name in config.modalities})
        # Shape [1], not []: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as.
        self.logit_scale = nn.Parameter(torch.tensor([logit_scale_init]))
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.tensor([logit_bias_init]))
        self.checkpointed_blocks: frozenset[int] = frozenset()
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT practice: Xavier-uniform linear weights, zero biases; then each embedder's own init
        (N(0, 0.02) token embeddings), in registry order.

        The MoE layers initialise their router and experts themselves (see `MoeMlp`), so that the
        global RNG advances the same whether or not the experts are sharded.
        """
        inside_moe = {id(m) for moe in self.moe_blocks for m in moe.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in inside_moe:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in self.embedders.values():
            embedder.init_weights()

    @property
    def moe_blocks(self) -> list[MoeMlp]:
        return [block.mlp for block in self.blocks if block.sparse]

    def set_activation_checkpointing(self, blocks: Literal["none", "moe", "all"]) -> None:
        """Recompute these blocks' forward in backward instead of keeping their activations: none,
        the MoE blocks (their capacity buffers are the largest) or all. Gradients are unchanged."""
        self.checkpointed_blocks = frozenset(
            index for index, block in enumerate(self.blocks) if blocks == "all" or (blocks == "moe" and block.sparse)
        )

    def modality_parts(self, name: str) -> dict[str, str]:
        """Where modality `name`'s own tensors lie in `state_dict()`: each name prefix with the part
        of the model it is ("embedder", "positions", …), for `train.init_from` to tell which tensors
        belong to a modality its source lacks and to name them. Every tensor not under one of these
        is shared by all modalities."""
        parts = {f"embedders.{name}.": "embedder", f"pools.{name}.": "pooling head",
                 f"projections.{name}.": "projection"}
        adapters = [index for index, block in enumerate(self.blocks) if isinstance(block, ModalityAdapter)]
        parts.update({f"blocks.{index}.{name}.": "adapter blocks" for index in adapters})
        parts.update({f"{name}_{key}": key.replace("cls_token", "class token").replace("_", " ")
                      for key in self.embedder_parameters.get(name, ()) if getattr(self, f"{name}_{key}") is not None})
        return parts

    # --- embeddings -------------------------------------------------------------------------

    def embed(self, name: str, batch: Tensor, **options) -> Tokens:
        """One modality's raw batch → its tokens, by its embedder with the positions (and class
        token) the tower holds for it as `<modality>_<key>` (`image_positions`): own parameters
        of the tower come before every submodule's in its parameter order, which is the order the
        optimizer groups and the global gradient norm's sum have always had. `options` go to the
        embedder (`keep` for images, audio and video; `at_mask`, `mask_embedding` for text). A modality the
        model does not embed is a LimoeError."""
        if name not in self.embedders:
            raise LimoeError(f"this model embeds {', '.join(self.config.modalities)}, not {name}; give it batches of "
                             f"its modalities, or use a model whose model.modalities include {name}.")
        held = {key: getattr(self, f"{name}_{key}") for key in self.embedder_parameters[name]}
        return self.embedders[name](batch, **held, **options)

    # --- tower ------------------------------------------------------------------------------

    def tower(self, streams: Mapping[str, Tokens]) -> tuple[dict[str, Tokens], list[LayerRouting]]:
        """Embedded streams by modality name (one or several) through every block as one sequence,
        in the model's order (routed jointly), and the final norm → each stream with its final tokens
        [B, N_s, d], by name."""
        ordered = [streams[name] for name in self.config.modalities if name in streams]
        layout = TokenLayout.of(ordered)
        x = ordered[0].x if len(ordered) == 1 else torch.cat([s.x for s in ordered], dim=1)  # [B, N, d]
        routing = []
        for index, block in enumerate(self.blocks):
            if index in self.checkpointed_blocks and torch.is_grad_enabled():
                # Keep only the block's input for backward and run the block again there;
                # torch.utils.checkpoint restores the RNG state (of x's device too) for the second
                # run, so the router noise and hence the routing are the same.
                x, layer_routing = checkpoint(block, x, layout, use_reentrant=False)
            else:
                x, layer_routing = block(x, layout)
            if layer_routing is not None:
                routing.append(layer_routing)
        x = self.norm(x)
        return {stream.name: replace(stream, x=x[:, s.start: s.start + s.length])
                for stream, s in zip(ordered, layout.segments)}, routing

    def features(self, stream: Tokens, normalize: bool = True) -> Tensor:
        """A stream's final tokens [B, N, d] → its modality's pooled, projected embedding [B, D]."""
        features = self.projections[stream.name](self.pools[stream.name](stream.x, stream.key_mask, stream.ids))
        return F.normalize(features, dim=-1) if normalize else features

    def encode(self, batches: Mapping[str, Tensor], options: Optional[Mapping[str, dict]] = None,
               normalize: bool = True) -> tuple[dict[str, Tensor], list[LayerRouting]]:
        """Raw batches by modality name through their embedders (with that modality's `options`,
        e.g. `{"image": {"keep": keep}}`), the tower together, and their heads → features [B_m, D]
        by name, and the routing records. Batches given together must hold the same B examples
        (their tokens are joined per example and routed together)."""
        streams = {name: self.embed(name, batch, **(options or {}).get(name, {})) for name, batch in batches.items()}
        streams, routing = self.tower(streams)
        return {name: self.features(stream, normalize) for name, stream in streams.items()}, routing

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """images [B, 3, H, W] → [B, D], L2-normalised by default (open_clip's interface)."""
        return self.encode({"image": images}, normalize=normalize)[0]["image"]

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """tokens [B, L] → [B, D], L2-normalised by default (open_clip's interface)."""
        return self.encode({"text": tokens}, normalize=normalize)[0]["text"]

    def encode_audio(self, waveforms: Tensor, normalize: bool = True) -> Tensor:
        """waveforms [B, T] float32 at model.audio.sample_rate → [B, D], L2-normalised by default.
        T is model.audio.clip_samples or fewer (`limoe.factory.preprocess_audio` makes such clips)."""
        return self.encode({"audio": waveforms}, normalize=normalize)[0]["audio"]

    def encode_video(self, clips: Tensor, normalize: bool = True) -> Tensor:
        """clips [B, T, 3, S, S], each frame normalised as images are, T ≤ model.video.frames a multiple
        of model.video.tubelet_frames → [B, D], L2-normalised by default (`limoe.factory.preprocess_video`
        makes such clips from frames)."""
        return self.encode({"video": clips}, normalize=normalize)[0]["video"]

    def forward(self, images: Optional[Tensor], tokens: Optional[Tensor],
                image_keep: Optional[Tensor] = None) -> Union[LimoeOutput, dict[str, Tensor]]:
        """Both modalities of a batch of pairs through the tower together (joint routing).

        → `LimoeOutput`, open_clip's tuple with the routing records attached, or with `output_dict`
        open_clip's dict (`LimoeOutput.as_dict`).

        Either may be None: one modality alone, with its routing (a classification batch's images,
        or its class prompts, whose counts differ from the images').
        `image_keep` [B, K]: encode only these patches of each image (FLIP); None: all of them.
        """
        batches = {name: batch for name, batch in (("image", images), ("text", tokens)) if batch is not None}
        features, routing = self.encode(batches, {"image": {"keep": image_keep}})
        output = LimoeOutput(features.get("image"), features.get("text"), self.logit_scale.exp(), self.logit_bias,
                             routing)
        return output.as_dict() if self.output_dict else output


def build_model(config: Config, sharding: ExpertSharding = ExpertSharding()) -> Limoe:
    """The model a training config describes: its architecture, with the logit scale (and, for the
    SigLIP loss, the logit bias) initialised as its loss config says."""
    bias = config.loss.logit_bias_init if config.loss.contrastive == "siglip" else None
    return Limoe(config.model, config.loss.logit_scale_init, bias, sharding)


def parameter_counts(model: Limoe) -> tuple[int, int]:
    """(total parameters, parameters applied to each token).

    A top-1 token passes through one of E experts, so (E−1)/E of every MoE layer's expert
    weights are not applied to it (the router is), nor the other modality's adapter blocks, nor
    what its embedder leaves aside (a text token reads one row of the token embedding table, not
    the table). Works on the `meta` device.
    """
    total = sum(p.numel() for p in model.parameters())
    unused = sum(embedder.unused_per_token() for embedder in model.embedders.values())
    for moe in model.moe_blocks:
        expert_params = sum(p.numel() for p in moe.expert_parameters())
        unused += expert_params * (moe.num_experts - 1) // moe.num_experts
    for adapter in model.blocks:
        if isinstance(adapter, ModalityAdapter):  # a token goes through its own modality's copy only
            unused += sum(p.numel() for p in adapter.parameters()) * (len(adapter) - 1) // len(adapter)
    return total, total - unused
