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
    """A pickle needs globals that ``torch.load(weights_only=True)`` refuses.

    ``globals`` lists them; nothing in the file was executed."""

    def __init__(self, path: str, unsafe_globals: list[str]):
        self.path = path
        self.unsafe_globals = unsafe_globals
        names = ", ".join(unsafe_globals) if unsafe_globals else "(unknown globals)"
        super().__init__(
            f"{path}: refusing to unpickle: it needs globals that are not plain tensors/containers: {names}. "
            "Nothing was executed. If you trust this file, pass --trust-pickle (trust_pickle=True)."
        )


class FormatError(OptckptError):
    """The data was read but is not a checkpoint optckpt understands (or is inconsistent)."""


class MappingError(OptckptError):
    """Optimizer indices could not be mapped to parameter names with the required certainty."""


class TargetError(OptckptError):
    """A ``--target`` / ``--source`` spec could not be resolved."""


class WriteError(OptckptError):
    """An output could not be written; the input is untouched and no partial output remains."""
