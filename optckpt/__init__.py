"""optckpt: inspect, check and repair PyTorch training checkpoints.

The public names are imported on first use (module ``__getattr__``), so that ``import optckpt``
— and with it ``optckpt --help``, ``--version`` and shell completion — does not pay torch's import."""

import importlib as _importlib
import typing as _typing
import warnings

# torch warns at import when numpy is absent; optckpt never needs numpy, and a CLI error must stay
# one line on stderr. Only this exact, benign message is filtered.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

if _typing.TYPE_CHECKING:
    from .checkpoint import Checkpoint, ModelState, OptimizerState, SchedulerState
    from .errors import FormatError, LoadError, MappingError, OptckptError, TargetError, UnsafePickleError, WriteError
    from .io import load
    from .resume import LoadReport, enable_load_by_name, load_optimizer_state_dict

__version__ = "0.1.0"

# public name -> the submodule that defines it
_SOURCES = {
    "Checkpoint": "checkpoint",
    "ModelState": "checkpoint",
    "OptimizerState": "checkpoint",
    "SchedulerState": "checkpoint",
    "OptckptError": "errors",
    "LoadError": "errors",
    "UnsafePickleError": "errors",
    "FormatError": "errors",
    "MappingError": "errors",
    "TargetError": "errors",
    "WriteError": "errors",
    "load": "io",
    "load_optimizer_state_dict": "resume",
    "enable_load_by_name": "resume",
    "LoadReport": "resume",
}

__all__ = list(_SOURCES)


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'optckpt' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{source}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
