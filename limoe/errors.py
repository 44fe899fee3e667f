"""The one exception type that means "the user gave us something wrong".

Library code raises `LimoeError` with a single sentence naming the problem and the fix; the
command line prints that sentence and exits non-zero instead of showing a traceback. Anything
else that escapes is a bug in limoe and keeps its traceback.
"""


class LimoeError(Exception):
    """A user-facing error: bad config, missing file, unusable data."""
