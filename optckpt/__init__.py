"""optckpt: inspect, check and repair PyTorch training checkpoints."""

import warnings

# torch warns at import when numpy is absent; optckpt never needs numpy, and a CLI error must stay
# one line on stderr. Only this exact, benign message is filtered.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from .checkpoint import Checkpoint, ModelState, OptimizerState, SchedulerState  # noqa: E402
from .errors import FormatError, LoadError, MappingError, OptckptError, TargetError, UnsafePickleError, WriteError  # noqa: E402
from .io import load  # noqa: E402
from .resume import LoadReport, enable_load_by_name, load_optimizer_state_dict  # noqa: E402

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
