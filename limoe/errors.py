"""What limoe tells a user about what they gave it: refused, or taken with a warning.

Library code raises `LimoeError` with a single sentence naming the problem and the fix; the
command line prints that sentence and exits non-zero instead of showing a traceback. Anything
else that escapes is a bug in limoe and keeps its traceback. Input that is usable but may not
mean what the user expects is taken, with one `warn` line on stderr.
"""

import sys

_WARNED: set[str] = set()


class LimoeError(Exception):
    """A user-facing error: bad config, missing file, unusable data."""


def warn(message: str) -> None:
    """One line on stderr about something the numbers depend on that the user may not expect;
    stdout keeps only the report. Each message is said once per process, so the trainer's
    periodic evaluations do not repeat it."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"limoe: warning: {message}", file=sys.stderr)
