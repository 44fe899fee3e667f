"""LIMoE: one transformer tower for images and text, with sparse top-1 expert MLPs.

Read top to bottom: the embeddings are per modality (patches + 2-D positions, tokens + 1-D
positions); the blocks run on one joint sequence per example (image tokens, then text tokens, one
residual tensor); every block weight, routers included, is shared, except in the first
`modality_adapter_layers` blocks (PolyViT's L_adapt), which come as one copy per modality;
attention runs over each example's own tokens of one modality; in an MoE block an example's
patches and caption tokens are routed together in one call, tagged by modality; per-modality
pooling heads and projections map into the joint space, where embeddings are L2-normalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from limoe.config import MODALITIES, Config, ModelConfig
from limoe.distributed import ExpertSharding
from limoe.model.layers import Attention, Mlp, Pool, Segment
from limoe.model.moe import MoeMlp
from limoe.model.routing import IMAGE, PADDING, TEXT, LayerRouting

PAD_TOKEN = 0  # open_clip's tokenizer pads with 0


@dataclass(frozen=True)
class Tokens:
    """One modality's embedded tokens, on their way into the tower."""

    x: Tensor  # [B, N, d]
    modality: Tensor  # [B, N] IMAGE, TEXT or PADDING per token
    key_mask: Optional[Tensor]  # [B, N] True where attention may look (None: everywhere)
    name: str  # "image" or "text": which copy of a modality adapter block the tokens take


@dataclass(frozen=True)
class TokenLayout:
    """Where each modality's tokens sit in the joint sequence the blocks run on."""

    modality: Tensor  # [B, N] IMAGE, TEXT or PADDING per token
    segments: tuple[Segment, ...]  # one per modality stream, in order; attention stays inside each
    names: tuple[str, ...]  # each segment's modality, "image" or "text"

    @classmethod
    def of(cls, streams: list[Tokens]) -> "TokenLayout":
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
            self.mlp = MoeMlp(config.width, config.mlp_dim, config.moe, sharding)
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
        super().__init__({modality: Block(config, False, ExpertSharding()) for modality in MODALITIES})

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
        self.patch_embed = nn.Conv2d(3, width, config.patch_size, config.patch_size)
        self.image_positions = nn.Parameter(torch.randn(config.num_patches, width) * 0.02)  # [Np, d]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if config.image_pool == "cls" else None
        self.token_embed = nn.Embedding(config.vocab_size, width)
        self.text_positions = nn.Parameter(torch.randn(config.context_length, width) * 0.01)  # [L, d]
        moe_layers = set(config.moe_layers)
        self.blocks = nn.ModuleList(
            ModalityAdapter(config) if i < config.modality_adapter_layers else Block(config, i in moe_layers, sharding)
            for i in range(config.depth)
        )
        self.norm = nn.LayerNorm(width)
        self.image_pool = Pool(config.image_pool, width, config.heads, config.mlp_dim)
        self.text_pool = Pool(config.text_pool, width, config.heads, config.mlp_dim)
        self.image_proj = nn.Linear(width, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(width, config.embed_dim, bias=False)
        # Shape [1], not []: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as.
        self.logit_scale = nn.Parameter(torch.tensor([logit_scale_init]))
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.tensor([logit_bias_init]))
        self.checkpointed_blocks: frozenset[int] = frozenset()
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT practice: Xavier-uniform linear weights, zero biases, N(0, 0.02) token embeddings.

        The MoE layers initialise their router and experts themselves (see `MoeMlp`), so that the
        global RNG advances the same whether or not the experts are sharded.
        """
        inside_moe = {id(m) for moe in self.moe_blocks for m in moe.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in inside_moe:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    @property
    def moe_blocks(self) -> list[MoeMlp]:
        return [block.mlp for block in self.blocks if block.sparse]

    def set_activation_checkpointing(self, blocks: Literal["none", "moe", "all"]) -> None:
        """Recompute these blocks' forward in backward instead of keeping their activations: none,
        the MoE blocks (their capacity buffers are the largest) or all. Gradients are unchanged."""
        self.checkpointed_blocks = frozenset(
            index for index, block in enumerate(self.blocks) if blocks == "all" or (blocks == "moe" and block.sparse)
        )

    # --- embeddings -------------------------------------------------------------------------

    def embed_image(self, images: Tensor, keep: Optional[Tensor] = None) -> Tokens:
        """images [B, 3, H, W] → patch tokens [B, Np(+1), d] with learned 2-D positions.

        With `keep` [B, K] (patch indices) only those patches enter the tower: MAE's visible
        patches, FLIP's kept share. They are selected here, before any block, so attention,
        routing groups, expert capacity and Batch Priority Routing all work on the K kept tokens.
        """
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.image_positions  # [B, Np, d]
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, d]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        modality = torch.full(x.shape[:2], IMAGE, device=x.device, dtype=torch.long)
        return Tokens(x, modality, None, "image")

    def embed_text(self, tokens: Tensor, at_mask: Optional[Tensor] = None,
                   mask_embedding: Optional[Tensor] = None) -> Tokens:
        """tokens [B, L] ids → [B, L, d]; padding is masked in attention and never routed.

        Masked language modelling shows `mask_embedding` [d] instead of the token's embedding
        where `at_mask` [B, L] is True (BERT's [MASK]); such tokens stay text and are routed.
        """
        real = tokens != PAD_TOKEN  # [B, L]
        x = self.token_embed(tokens)  # [B, L, d]
        if at_mask is not None:
            x = torch.where(at_mask[..., None], mask_embedding.to(x.dtype), x)
        x = x + self.text_positions[: tokens.shape[1]]
        modality = torch.where(real, TEXT, PADDING)
        return Tokens(x, modality, real, "text")

    # --- tower ------------------------------------------------------------------------------

    def tower(self, streams: list[Tokens]) -> tuple[list[Tokens], list[LayerRouting]]:
        """One or both modalities' streams through every block as one sequence (routed jointly)
        and the final norm → each stream with its final tokens [B, N_s, d]."""
        layout = TokenLayout.of(streams)
        x = streams[0].x if len(streams) == 1 else torch.cat([s.x for s in streams], dim=1)  # [B, N, d]
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
        return [replace(stream, x=x[:, s.start: s.start + s.length]) for stream, s in zip(streams, layout.segments)], routing

    def _image_features(self, stream: Tokens, normalize: bool = True) -> Tensor:
        features = self.image_proj(self.image_pool(stream.x))  # [B, D]
        return F.normalize(features, dim=-1) if normalize else features

    def _text_features(self, stream: Tokens, tokens: Tensor, normalize: bool = True) -> Tensor:
        features = self.text_proj(self.text_pool(stream.x, stream.key_mask, tokens))  # [B, D]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """images [B, 3, H, W] → [B, D], L2-normalised by default (open_clip's interface)."""
        (stream,), _ = self.tower([self.embed_image(images)])
        return self._image_features(stream, normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """tokens [B, L] → [B, D], L2-normalised by default (open_clip's interface)."""
        (stream,), _ = self.tower([self.embed_text(tokens)])
        return self._text_features(stream, tokens, normalize)

    def forward(self, images: Optional[Tensor], tokens: Optional[Tensor],
                image_keep: Optional[Tensor] = None) -> Union[LimoeOutput, dict[str, Tensor]]:
        """Both modalities of a batch of pairs through the tower together (joint routing).

        → `LimoeOutput`, open_clip's tuple with the routing records attached, or with `output_dict`
        open_clip's dict (`LimoeOutput.as_dict`).

        Either may be None: one modality alone, with its routing (a classification batch's images,
        or its class prompts, whose counts differ from the images').
        `image_keep` [B, K]: encode only these patches of each image (FLIP); None: all of them.
        """
        streams = ([self.embed_image(images, image_keep)] if images is not None else []) + (
            [self.embed_text(tokens)] if tokens is not None else [])
        streams, routing = self.tower(streams)
        image = self._image_features(streams[0]) if images is not None else None
        text = self._text_features(streams[-1], tokens) if tokens is not None else None
        output = LimoeOutput(image, text, self.logit_scale.exp(), self.logit_bias, routing)
        return output.as_dict() if self.output_dict else output


def build_model(config: Config, sharding: ExpertSharding = ExpertSharding()) -> Limoe:
    """The model a training config describes: its architecture, with the logit scale (and, for the
    SigLIP loss, the logit bias) initialised as its loss config says."""
    bias = config.loss.logit_bias_init if config.loss.contrastive == "siglip" else None
    return Limoe(config.model, config.loss.logit_scale_init, bias, sharding)


def parameter_counts(model: Limoe) -> tuple[int, int]:
    """(total parameters, parameters applied to each token).

    A top-1 token passes through one of E experts, so (E−1)/E of every MoE layer's expert
    weights are not applied to it (the router is), nor the other modality's adapter blocks; a
    text token reads one row of the token embedding table, not the table. Works on the `meta` device.
    """
    total = sum(p.numel() for p in model.parameters())
    unused = model.token_embed.weight.numel() - model.token_embed.weight.shape[1]
    for moe in model.moe_blocks:
        expert_params = sum(p.numel() for p in moe.expert_parameters())
        unused += expert_params * (moe.num_experts - 1) // moe.num_experts
    for adapter in model.blocks:
        if isinstance(adapter, ModalityAdapter):  # a token goes through its own modality's copy only
            unused += sum(p.numel() for p in adapter.parameters()) * (len(adapter) - 1) // len(adapter)
    return total, total - unused
