"""Errors that reach the user as one clear line instead of a traceback."""

from .config import ConfigError


class RunError(RuntimeError):
    """A run could not go on (missing data, non-finite loss, ...): exit code 1."""


__all__ = ["ConfigError", "RunError"]
