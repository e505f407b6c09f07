"""The exception hierarchy. The CLI catches :class:`OptckptError` once and prints one line."""

from __future__ import annotations

__all__ = [
    "OptckptError",
    "LoadError",
    "UnsafePickleError",
    "FormatError",
    "MappingError",
    "TargetError",
    "WriteError",
]


class OptckptError(Exception):
    """Base class: every error optckpt raises on purpose. Its message is one line that says
    what went wrong and, where possible, how to fix it."""


class LoadError(OptckptError):
    """A file or directory could not be read (missing, unreadable, truncated, corrupt)."""


class UnsafePickleError(LoadError):
    """A pickle that cannot be read without running code from it.

    ``unsafe_globals`` lists the globals a full unpickle would import and call; ``reason`` says why
    the safe reader could not stand in for them. Nothing in the file was executed."""

    def __init__(self, path: str, unsafe_globals: list[str], reason: str | None = None):
        self.path = path
        self.unsafe_globals = unsafe_globals
        names = ", ".join(unsafe_globals) if unsafe_globals else "(unknown globals)"
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"{path}: refusing to unpickle: it cannot be read without running its code{why}. Nothing was executed. "
            f"If you trust this file, --trust-pickle (trust_pickle=True) would import and call: {names}."
        )


class FormatError(OptckptError):
    """The data was read but is not a checkpoint optckpt understands (or is inconsistent)."""


class MappingError(OptckptError):
    """Optimizer indices could not be mapped to parameter names with the required certainty."""


class TargetError(OptckptError):
    """A ``--target`` / ``--source`` spec could not be resolved."""


class WriteError(OptckptError):
    """An output could not be written; the input is untouched and no partial output remains."""
