"""Error types whose message is the whole story for a user.

The CLI prints ``str(error)`` on one line and exits non-zero; nothing else should reach
the terminal as a stack trace for bad input.
"""

from __future__ import annotations


class PrispError(Exception):
    """Base class: a problem the user can fix, explained in one line."""


class DataError(PrispError):
    """A data file is missing, malformed or inconsistent."""


class ModelNotFoundError(PrispError):
    """A base model cannot be found offline."""


class DownloadError(PrispError):
    """A download failed (offline, HTTP error, checksum mismatch)."""


class AdapterError(PrispError):
    """An adapter is missing, malformed or does not fit the base model."""
