"""Consistency checks of an optimizer state dict before anything is inferred from it or written."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .checkpoint import OptimizerState
from .errors import FormatError
from .tensors import is_tensor

__all__ = ["validate_optimizer", "global_entries"]


def global_entries(state: dict[Any, Any]) -> dict[Any, Any]:
    """The entries of an index-based optimizer state that belong to no parameter (string keys:
    MADGRAD's step counter ``k``, SPAM's ``total_step``): carried as they are by every edit."""
    return {k: v for k, v in state.items() if not isinstance(k, int)}


def validate_optimizer(opt: OptimizerState) -> list[str]:
    """Raise :class:`FormatError` for a state dict torch itself could not load; return warnings for
    data that is valid but suspicious (state for indices in no group, non-tensor junk in state)."""
    groups = opt.state_dict.get("param_groups", [])
    indices: list[object] = [i for g in groups for i in g.get("params", [])]
    fqn = bool(indices) and all(isinstance(i, str) for i in indices)  # the DCP / get_state_dict layout
    bad = [i for i in indices if not fqn and (not isinstance(i, int) or isinstance(i, bool))]
    if bad:
        raise FormatError(f"{opt.name}: param_groups hold non-integer parameter ids, e.g. {bad[0]!r}")
    dupes = [i for i, n in Counter(indices).items() if n > 1]
    if dupes:
        raise FormatError(f"{opt.name}: parameter index {dupes[0]} appears in more than one place in param_groups "
                          "(torch never writes that: the file is inconsistent)")
    warnings = []
    known = set(indices)
    # non-index keys of an index-based state are global entries (MADGRAD's ``k``, SPAM's ``total_step``):
    # carried as they are, never per-parameter
    orphans = [k for k in opt.state if k not in known and (fqn or isinstance(k, int))]
    if orphans:
        warnings.append(f"{opt.name}: state for indices in no param group: {orphans[:8]} (ignored)")
    state = opt.state
    values = list(state.values())
    distinct = dict(zip(map(id, values), values)).values()  # each entry object once (entries may be shared)
    if set(map(type, distinct)) <= {dict} and \
            {type(v).__name__ for e in distinct for v in e.values()} <= _PLAIN_NAMES:
        return warnings  # the common case, checked in one pass
    for k, entry in state.items():
        if not fqn and not isinstance(k, int):
            continue  # a global entry: any value
        if not isinstance(entry, dict):
            raise FormatError(f"{opt.name}: state[{k!r}] is a {type(entry).__name__}, not a dict of state values")
        junk = [key for key, v in entry.items()
                if not isinstance(v, _ALLOWED) and not is_tensor(v) and not hasattr(v, "shape")]
        if junk:
            warnings.append(f"{opt.name}: state[{k}] holds non-tensor values under {junk[:4]}")
    return warnings


_ALLOWED = (int, float, bool, list, tuple, type(None))
_PLAIN_NAMES = frozenset({"Tensor", "Parameter", "RecordTensor", "int", "float", "bool", "list", "tuple", "NoneType",
                          "DCPTensorRef"})
