"""Exceptions shared by both halves; each message should tell the user what to do next."""

from __future__ import annotations


class MoepackError(Exception):
    """Base class for errors moepack reports to the user (the CLI prints them without a traceback)."""


class UsageError(MoepackError, ValueError):
    """A value the user gave (an option, a budget, a prompt) that cannot be used; the message says what would be."""


class PackError(MoepackError):
    """A pack is missing, incomplete, corrupt or of an unsupported version."""


class SourceError(MoepackError):
    """A source checkpoint cannot be converted (missing shard, bad shape, unknown dtype...)."""


class UnsupportedArchitecture(MoepackError):
    """The checkpoint's architecture is not one moepack knows."""


class BudgetError(MoepackError):
    """The memory budget cannot hold the dense weights plus one layer's routed experts.

    ``minimum`` is the smallest budget in bytes that would work, so callers can retry with it.
    """

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum


class ExpertReadError(PackError, OSError):
    """An expert file could not be read: missing, truncated, unreadable (EIO), or its bytes fail ``verify``.

    Only the call that needed the expert fails; the store forgets the slot and serves the next call. It is an
    OSError too (``filename`` is the file), for callers that handle I/O errors as such.
    """

    def __init__(self, message: str, filename: str | None = None):
        super().__init__(message)
        self.filename = filename

    def __str__(self) -> str:  # OSError's own would print "[Errno None] ..."
        return self.args[0]
