"""The error types whose messages kdaudit shows the user as they are (one line, no traceback)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and field."""


class FolderBusyError(RuntimeError):
    """Another kdaudit process holds the lock of the output folder."""
