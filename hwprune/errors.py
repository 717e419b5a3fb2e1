"""User-facing errors.

Every problem a user can cause (bad input, missing backend, unreadable table) raises
:class:`HwpruneError`. The CLI prints its message on one line, without a traceback, and
exits with a non-zero code. The message says what is wrong and, where possible, what
to do about it.
"""

from __future__ import annotations


class HwpruneError(Exception):
    """An error caused by input or environment that the user can fix."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class BackendUnavailable(HwpruneError):
    """A backend's libraries or hardware are not present on this machine."""


class TableMismatch(HwpruneError):
    """Two tables, or a table and the requested settings, describe different devices or settings."""


class TableError(HwpruneError):
    """A latency table is missing, corrupt, truncated or empty."""
