"""The one exception type for mistakes a user can make (bad file, bad field, bad option).

The CLI prints a DtmError as a short message without a traceback; anything else is a bug in
dtm_fast and keeps its traceback.
"""


class DtmError(Exception):
    """A user-facing error: the message says what was wrong, where, and what to do."""
