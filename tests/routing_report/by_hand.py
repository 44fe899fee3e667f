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


def assert_counts_as_routed_by_hand(report: dict, by_hand: dict, model: Limoe, modality: str, tokens: int) -> None:
    """The report's per-layer counts of `modality` and text are the tokens routed to each expert by
    hand (all kept: dropless), `modality` has `tokens` tokens in each layer and the unread images none."""
    assert report["modality"] == modality
    statistics = report["checkpoints"][0]["statistics"]
    modalities = list(model.config.modalities)
    assert len(statistics["layers"]) == len(by_hand["experts"]) == 2
    for layer, experts in zip(statistics["layers"], by_hand["experts"]):
        for name in (modality, "text"):
            chosen = experts[by_hand["ids"] == modalities.index(name)]  # [tokens of the modality]
            expected = torch.bincount(chosen, minlength=statistics["num_experts"]).tolist()
            assert layer[name]["routed"] == layer[name]["kept"] == expected  # dropless: all kept
            assert layer[name]["tokens"] == sum(expected)
        assert layer[modality]["tokens"] == tokens
        assert layer["image"]["tokens"] == 0  # the model's images, not read
