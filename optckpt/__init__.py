"""optckpt: inspect, check and repair PyTorch training checkpoints."""

from .checkpoint import Checkpoint, ModelState, OptimizerState, SchedulerState
from .errors import FormatError, LoadError, MappingError, OptckptError, TargetError, UnsafePickleError, WriteError
from .io import load
from .resume import LoadReport, enable_load_by_name, load_optimizer_state_dict

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "ModelState",
    "OptimizerState",
    "SchedulerState",
    "OptckptError",
    "LoadError",
    "UnsafePickleError",
    "FormatError",
    "MappingError",
    "TargetError",
    "WriteError",
    "load",
    "load_optimizer_state_dict",
    "enable_load_by_name",
    "LoadReport",
]
