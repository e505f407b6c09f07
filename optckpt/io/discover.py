"""Finding model / optimizer / scheduler state dicts wherever they sit inside a loaded object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..checkpoint import KeyPath, ModelState, OptimizerState, SchedulerState, TensorMeta, path_str
from ..tensors import RecordTensor, is_tensor, is_torch_module, storage_identity
from .safepickle import PickledObject, describe, is_module_object, module_tensors

if TYPE_CHECKING:
    import torch

__all__ = ["Found", "discover", "is_optimizer_sd", "is_scheduler_sd", "is_model_sd", "model_state_from_dict"]

_MAX_DEPTH = 8
_SCALARS = (bool, int, float, str, type(None))
# keys users bundle the main model under, in preference order (the EMA copy is never "the" model)
MODEL_KEY_PREFERENCE = ("model", "state_dict", "model_state_dict", "net", "module", "network", "model_state")


def is_optimizer_sd(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state"), Mapping)
        and isinstance(obj.get("param_groups"), list)
        and all(isinstance(g, Mapping) and "params" in g for g in obj["param_groups"])
    )


def is_scheduler_sd(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or is_optimizer_sd(obj):
        return False
    if "_schedulers" in obj:
        return True
    if "last_step" in obj and "base_values" in obj and "param_name" in obj:  # mmengine's _ParamScheduler
        return True
    return "last_epoch" in obj and any(
        k in obj for k in ("base_lrs", "_last_lr", "best", "num_bad_epochs", "_step_count")
    )


def is_model_sd(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    n_tensors = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            return False
        if is_tensor(v):
            n_tensors += 1
        elif not k.endswith("_extra_state"):
            return False
    return n_tensors > 0


def tied_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Tied tensors (the same storage, offset, shape, strides and dtype): each later name mapped to
    the first name holding that tensor (a language model head that is its input embedding)."""
    tied: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    for k, t in tensors.items():
        if type(t) is RecordTensor:  # (the common case inlined: a 600k-storage file has 150k of them)
            if t.storage_nbytes and 0 not in t.shape:
                ident = ((t.source.path, t.key), t.storage_offset(), t.shape, t.stride(), t.dtype.name)
                if ident in first:
                    tied[k] = first[ident]
                else:
                    first[ident] = k
            continue
        if t.numel() == 0:
            continue
        storage = storage_identity(t)
        if storage is None:  # meta tensors have no storage: no ties to see
            continue
        ident = (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
        if ident in first:
            tied[k] = first[ident]
        else:
            first[ident] = k
    return tied


def model_state_from_dict(sd: Mapping[str, Any], name: str, part: str, path: KeyPath) -> ModelState:
    """A pickled state dict: its order is the registration order; tied tensors share storage."""
    tensors = {k: v for k, v in sd.items() if is_tensor(v)}
    meta = {k: TensorMeta.of(v) for k, v in tensors.items()}
    return ModelState(name=name, part=part, path=path, tensors=tensors, meta=meta, order_trusted=True,
                      tied=tied_keys(tensors))


@dataclass
class Found:
    models: list[ModelState] = field(default_factory=list)
    optimizers: list[OptimizerState] = field(default_factory=list)
    schedulers: list[SchedulerState] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    other_keys: dict[str, str] = field(default_factory=dict)
    objects: dict[str, PickledObject] = field(default_factory=dict)


def discover(obj: Any, part: str, *, name_prefix: str = "") -> Found:
    """Walk dicts, lists and tuples; every state dict found is named by its key path
    (prefixed by ``name_prefix``, e.g. the file name inside a directory checkpoint)."""
    found = Found()
    _walk(obj, (), 0, found, part, name_prefix)
    _collect_top_level(obj, found)
    _order_models(found)
    return found


def _name_of(path: KeyPath, name_prefix: str) -> str:
    p = path_str(path)
    if name_prefix:
        return f"{name_prefix}:{p}" if p else name_prefix
    return p or "(root)"


def _walk(o: Any, path: KeyPath, depth: int, found: Found, part: str, prefix: str) -> bool:
    """:func:`discover`'s walk below ``o``: whether anything was found there. (A module-level function:
    a recursive closure refers to itself, a cycle that would keep everything found alive until a
    cyclic collection, which the ``optckpt`` program does not run.)"""
    if is_optimizer_sd(o):
        found.optimizers.append(OptimizerState(_name_of(path, prefix), part, path, o))
        return True
    if is_scheduler_sd(o):
        found.schedulers.append(SchedulerState(_name_of(path, prefix), part, path, o))
        return True
    if is_model_sd(o):
        found.models.append(model_state_from_dict(o, _name_of(path, prefix), part, path))
        return True
    if is_module_object(o) or is_torch_module(o):  # a whole pickled nn.Module, by attribute path
        tensors = module_tensors(o) if isinstance(o, PickledObject) else o.state_dict()  # (--trust-pickle: real)
        found.models.append(model_state_from_dict(tensors, _name_of(path, prefix), part, path))
        return True
    if depth >= _MAX_DEPTH:
        return False
    hit = False
    if isinstance(o, Mapping):
        beside = _per_parameter_siblings(o)
        for k, v in o.items():
            if k in beside:
                continue  # per-parameter data of a wrapped optimizer, not a model
            if isinstance(v, (Mapping, list, tuple, PickledObject)) or is_torch_module(v):
                hit = _walk(v, (*path, k), depth + 1, found, part, prefix) or hit
        if beside:
            for opt in found.optimizers:
                if opt.path[:-1] == path:
                    opt.overridden = (f"{path_str(opt.path)} sits beside {', '.join(map(repr, beside))}, "
                                      "entries keyed per parameter outside torch's 'state'")
    elif isinstance(o, (list, tuple)):
        for i, v in enumerate(o):
            if isinstance(v, (Mapping, list, tuple, PickledObject)) or is_torch_module(v):
                hit = _walk(v, (*path, i), depth + 1, found, part, prefix) or hit
    return hit


def _per_parameter_siblings(o: Mapping[Any, Any]) -> list[Any]:
    """Keys of ``o`` that hold per-parameter entries beside an optimizer state dict ``o`` also holds:
    dicts keyed by its indices or by (group, position) tuples."""
    opts = [v for v in o.values() if is_optimizer_sd(v)]
    if not opts:
        return []
    indices = {i for sd in opts for g in sd.get("param_groups", []) if isinstance(g, Mapping)
               for i in g.get("params", ()) if isinstance(i, int)}

    def keyed(v: Any) -> bool:
        return isinstance(v, Mapping) and bool(v) and all(
            (isinstance(k, int) and k in indices)
            or (isinstance(k, tuple) and bool(k) and all(isinstance(x, int) for x in k)) for k in v)

    return [k for k, v in o.items() if not is_optimizer_sd(v) and keyed(v)]


def _collect_top_level(obj: Any, found: Found) -> None:
    """Scalars at the top level are extras (epoch, global_step, best_acc1); the rest is summarised."""
    claimed = {m.path[:1] for m in found.models} | {o.path[:1] for o in found.optimizers}
    claimed |= {s.path[:1] for s in found.schedulers}
    if () in claimed:  # the whole object is one state dict: nothing else at its top level
        return
    items: list[tuple[Any, Any]]
    if isinstance(obj, Mapping):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        return
    for k, v in items:
        key = path_str((k,))
        if k == "extra" and isinstance(v, Mapping) and v and all(isinstance(x, _SCALARS) for x in v.values()):
            found.extras.update({str(kk): vv for kk, vv in v.items()})  # torchtitan's {"extra": {...}}
            continue
        if k == "meta" and isinstance(v, Mapping):  # mmengine's {"meta": {"epoch", "iter", ...}}
            found.extras.update({f"meta.{kk}": vv for kk, vv in v.items() if isinstance(vv, _SCALARS)})
        if isinstance(v, PickledObject):
            found.objects[key] = v
        if isinstance(v, _SCALARS):
            found.extras[key] = v
        elif is_tensor(v) and v.numel() == 1 and v.ndim == 0:
            found.extras[key] = v.item()
        elif (k,) not in claimed:
            found.other_keys[key] = summarize(v)


def summarize(v: Any) -> str:
    if isinstance(v, PickledObject):
        return describe(v)
    if is_tensor(v):
        return f"tensor{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, Mapping):
        return f"dict ({len(v)} keys)"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} ({len(v)} items)"
    return type(v).__name__


def _order_models(found: Found) -> None:
    """Put the main model first: a preferred key, never an EMA copy."""

    def rank(m: ModelState) -> tuple[int, int]:
        top = str(m.path[0]) if m.path else ""
        ema = int("ema" in m.name.lower())
        pref = MODEL_KEY_PREFERENCE.index(top) if top in MODEL_KEY_PREFERENCE else len(MODEL_KEY_PREFERENCE)
        return ema, pref

    found.models.sort(key=rank)
