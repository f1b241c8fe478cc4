"""The project's own exceptions.

Every error a user can cause (a bad argument, a missing folder, a broken image, a tampered
checkpoint) is a :class:`FakescopeError`; the CLI prints its message on one line and exits
with its ``exit_code`` instead of showing a traceback.
"""

from __future__ import annotations


class FakescopeError(Exception):
    """A user-facing error: the message says what was expected, what was got, and how to fix it."""

    exit_code = 2


class ArgumentError(FakescopeError, ValueError):
    """A bad argument to a library function (a threshold outside [0, 1], ...): a :class:`ValueError` too,
    so code that catches ValueError keeps working."""


class ImageReadError(FakescopeError):
    """An image file that cannot be decoded (empty, truncated, not an image, too large...)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class CheckpointError(FakescopeError):
    """A run directory or weights file that cannot be trusted or does not match its config."""


class DataError(FakescopeError):
    """A data root or selection that cannot be used."""
