"""optckpt: inspect, check and repair PyTorch training checkpoints.

The public names are imported on first use (module ``__getattr__``), so that ``import optckpt``
— and with it ``optckpt --help``, ``--version`` and shell completion — does not pay torch's import."""

import importlib as _importlib
import sys as _sys
import types as _types
import typing as _typing
import warnings

# torch warns at import when numpy is absent; optckpt never needs numpy, and a CLI error must stay
# one line on stderr. Only this exact, benign message is filtered.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

if _typing.TYPE_CHECKING:  # the names as type checkers see them (the ``as`` form marks a re-export)
    from .checkpoint import Checkpoint as Checkpoint
    from .checkpoint import ModelState as ModelState
    from .checkpoint import OptimizerState as OptimizerState
    from .checkpoint import SchedulerState as SchedulerState
    from .errors import FormatError as FormatError
    from .errors import LoadError as LoadError
    from .errors import MappingError as MappingError
    from .errors import OptckptError as OptckptError
    from .errors import TargetError as TargetError
    from .errors import UnsafePickleError as UnsafePickleError
    from .errors import WriteError as WriteError
    from .io import load as load
    from .resume import LoadReport as LoadReport
    from .resume import enable_load_by_name as enable_load_by_name
    from .resume import load_optimizer_state_dict as load_optimizer_state_dict
    from .verbs import Report as Report
    from .verbs import check as check
    from .verbs import convert as convert
    from .verbs import diff as diff
    from .verbs import inspect as inspect
    from .verbs import remap as remap
    from .verbs import reset as reset
    from .verbs import set_hparams as set_hparams

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
    # the commands as functions returning their reports (optckpt.verbs)
    "Report": "verbs",
    "inspect": "verbs",
    "check": "verbs",
    "remap": "verbs",
    "reset": "verbs",
    "set_hparams": "verbs",
    "diff": "verbs",
    "convert": "verbs",
}

__all__ = list(_SOURCES)


# The verbs share their names with modules that implement parts of them (the function optckpt.check,
# the module optckpt/check.py): importing a submodule would set the package attribute to the module.
# The package's class makes these attributes the functions for good; the modules stay importable by
# their dotted names (``from optckpt.check import check_mapping``, ``importlib.import_module``).
_VERBS = ("inspect", "check", "remap", "reset", "diff", "convert")


def _verb(name: str) -> property:
    def get(self: _types.ModuleType) -> object:
        return getattr(_importlib.import_module(".verbs", __name__), name)

    def ignore(self: _types.ModuleType, value: object) -> None:
        pass  # the import system recording the submodule of the same name

    return property(get, ignore, doc=f"optckpt.verbs.{name}")


class _Package(_types.ModuleType):
    pass


for _name in _VERBS:
    setattr(_Package, _name, _verb(_name))
_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'optckpt' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{source}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
