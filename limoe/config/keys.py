"""Documented keys: every config key says what it means and, if it holds numbers, which are valid.

A key is declared with `setting(default, meaning, valid)`. The codec checks each number a key holds
against its interval when a config is loaded, so that a bad value is one line naming the key before
any data is read or model built; `limoe config show` and docs/CONFIG.md print the meaning beside it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Interval:
    """The valid values of a numeric key, written as in mathematics: `[1, inf)`, `(0, 1]`."""

    text: str

    def __post_init__(self):
        if _INTERVAL.fullmatch(self.text) is None:
            raise ValueError(f"cannot read the interval {self.text!r}; write it like '[1, inf)' or '(0, 1]'.")

    def __contains__(self, number: float) -> bool:
        left, low, high, right = _INTERVAL.fullmatch(self.text).groups()
        above = number >= float(low) if left == "[" else number > float(low)
        below = number <= float(high) if right == "]" else number < float(high)
        return above and below  # False for NaN; an open end at inf excludes inf

    def __str__(self) -> str:
        return self.text


_INTERVAL = re.compile(r"([\[(])(-inf|[-+\d.e]+), (inf|[-+\d.e]+)([\])])")


def setting(default: Any = dataclasses.MISSING, meaning: str = "", valid: Optional[str] = None) -> Any:
    """A config key: its default, what it means, and for a numeric key the interval every number it
    holds must lie in (checked when a config is loaded). `limoe config show` prints the meaning
    beside the key; docs/CONFIG.md lists every key and a test keeps it in step with the dataclasses."""
    return field(default=default, metadata={"meaning": meaning, "valid": Interval(valid) if valid else None})
