"""User-facing errors.

Every problem a user can fix (bad names, missing data, broken files) is raised as an
:class:`FsmisError`. The CLI prints its message and hint on one line each and exits with
status 2, never a traceback.
"""

from __future__ import annotations


class FsmisError(Exception):
    """An error caused by input the user can fix.

    Args:
        message: what went wrong, in one sentence.
        hint: what to do about it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UnknownNameError(FsmisError, KeyError):
    """A registry lookup for a name that nobody registered."""


class NameCollisionError(FsmisError):
    """Two plugins registered the same name in one registry."""


class DataError(FsmisError):
    """A data root, file or volume is missing or malformed."""


class ConfigError(FsmisError):
    """A configuration value is invalid."""


class DataWarning(UserWarning):
    """Data that can be used but may not mean what the user expects (the CLI prints it once)."""
