"""The modalities a tower can read, in order: this registry, and one module per modality.

A model embeds some of them, `model.modalities` (by default `DEFAULT_MODALITIES`, image and
text), kept in registry order. A modality's id is its index in the model's own list
(`ModelConfig.modality_id`): the tag each of its tokens carries into the MoE layers and the row of
every per-modality routing statistic ([M, E] counts, [G, M] entropies, M = the model's count). So
an image-text model numbers image 0 and text 1 whatever else is registered. Padding tokens carry
`PADDING` and are never routed. The order is also the order of the joint sequence the blocks run
on (an example's image tokens, then its text tokens, then its audio tokens, then its video tokens).

Each modality's module (`limoe.modalities.image`, `text`, `audio`, `video`) holds what is particular to it
as one `Modality` record: its embedder (raw batch → tokens with positions), which pooling its
config asks for, its colour in routing pictures, its short label in progress lines and the dummy
batch `limoe plan` measures with. An embedder's output is `tokens.Tokens`, which the tower
(`limoe.model.tower`) runs its blocks on. Everything else loops over the model's modalities.

This root imports neither torch nor the modality modules (`modality` imports one when asked), so
the config can read the names without loading the model. A new modality is a module here that
defines `MODALITY`, its name at the end of `MODALITIES` (so that no model's order changes), and
its numbers in `limoe.config.loss.MODALITY_DEFAULTS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol

if TYPE_CHECKING:
    from torch import Tensor, nn

    from limoe.config import ModelConfig
    from limoe.modalities.tokens import Tokens

MODALITIES: tuple[str, ...] = ("image", "text", "audio", "video")  # registry order: a model's modalities keep it
DEFAULT_MODALITIES: tuple[str, ...] = ("image", "text")  # what a model embeds unless model.modalities says otherwise
PADDING = -1  # the id of padding tokens: never routed, counted under no modality


class Embedder(Protocol):
    """What the tower (`limoe.model.tower.Limoe`) asks of a modality's embedder, an `nn.Module`
    built from the model config in registry order."""

    def tower_parameters(self, config: ModelConfig) -> dict[str, Optional[nn.Parameter]]:
        """Its learned positions (and the like), drawn right after its own layers: the tower holds
        them as `<modality>_<key>` and passes them back to `forward` by key."""

    def init_weights(self) -> None:
        """What it draws after the tower's linear layers are initialised (the token table's N(0, 0.02))."""

    def unused_per_token(self) -> int:
        """How many of its parameters one token is not computed with (`parameter_counts`)."""

    def __call__(self, batch: Tensor, **held_and_options) -> Tokens:
        """The raw batch (as the model takes it) → its tokens; `held_and_options` are the tower's
        parameters for it and per-call options (`keep`, `at_mask`)."""


@dataclass(frozen=True)
class Modality:
    """What the rest of limoe needs to know about one modality."""

    name: str
    short_name: str  # in the training progress line ("routed img/txt/aud/vid")
    color: str  # in routing pictures
    embedder: Callable[[ModelConfig], Embedder]  # config → the module turning a raw batch into `Tokens`
    pool: Callable[[ModelConfig], str]  # config → its pooling kind for this modality (map, cls, mean, eos)
    dummy_batch: Callable[[ModelConfig, int], Tensor]  # (config, B) → a batch of B inputs, as the model takes them


def modality(name: str) -> Modality:
    """The record of a registered modality, from its module `limoe.modalities.<name>`."""
    if name not in MODALITIES:
        raise KeyError(f"{name!r} is not a registered modality; these are: {', '.join(MODALITIES)}")
    return importlib.import_module(f"{__name__}.{name}").MODALITY


def registered() -> tuple[Modality, ...]:
    """Every registered modality's record, in registry order."""
    return tuple(modality(name) for name in MODALITIES)
