"""The routing the `limoe routing` tests work out by hand: every sample encoded with its caption
in one forward, each token's top-1 expert beside the modality its embedder tagged it with."""

import torch

from limoe.data.preprocess import tokenizer
from limoe.model.tower import Limoe


def route_by_hand(model: Limoe, modality: str, inputs: torch.Tensor, captions: list[str]) -> dict:
    """inputs [N, ...] of `modality` and their captions through `model` together: per MoE layer the
    top-1 expert [N, tokens] of every token ("experts"), and every token's modality id [N, tokens]
    ("ids"; padding: none of the model's)."""
    tokens = tokenizer(model.config.context_length)(captions)  # [N, L]
    with torch.no_grad():
        streams = {modality: model.embed(modality, inputs), "text": model.embed("text", tokens)}
        _, routing = model.tower(streams)
    ids = torch.cat([streams[name].modality for name in model.config.modalities if name in streams], dim=1)
    return {"ids": ids, "experts": [layer.expert for layer in routing]}
