"""The modalities a tower can embed, and a number per modality for the keys that hold one."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from limoe.errors import LimoeError
from limoe.modalities import MODALITIES  # noqa: F401  (re-exported: the registry's names, in registry order)


class PerModality(Mapping[str, float]):
    """One number per modality by name (loss weights, entropy thresholds), written in YAML as a
    mapping: `{image: 0.01, text: 0.01}`. The key holding it says which values are valid (the
    codec checks each number against the key's interval, `value_type` says what a number is).
    Immutable and hashable like the rest of the config; iterates in the order it was given."""

    value_type = float

    def __init__(self, values: Mapping[str, float] = (), /, **named: float):
        self._values = {**dict(values), **named}

    def __getitem__(self, modality: str) -> float:
        return self._values[modality]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(frozenset(self._values.items()))  # as equality (Mapping's), whatever the order

    def __repr__(self) -> str:
        return f"PerModality({self._values!r})"

    def for_modalities(self, modalities: Sequence[str], defaults: Mapping[str, float], key: str) -> "PerModality":
        """The number of each of `modalities`, in their order: the one given here, else its default.
        A modality named here that is not among `modalities` is an error naming `key`."""
        stray = [name for name in self if name not in modalities]
        if stray:
            raise LimoeError(f"config key '{key}' names '{stray[0]}', which is not one of model.modalities "
                             f"({', '.join(modalities)}); remove it or add it to model.modalities.")
        return PerModality({name: self[name] if name in self else defaults[name] for name in modalities})
