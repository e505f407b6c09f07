"""``optckpt inspect``: a JSON-able report of what a checkpoint holds, from metadata alone
(tensor data is read only for ``stats=True``)."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from itertools import chain, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, ModelState, OptimizerState, SchedulerState
from .gcpause import gc_paused
from .io.safepickle import describe, fields_of, is_module_object
from .kinds import guess_optimizer, guess_scheduler
from .mapping import IndexName, OptimizerMapping
from .render import jsonable, plain_rows
from .resolve import resolve
from .tensors import RecordTensor, is_tensor

if TYPE_CHECKING:
    import torch

__all__ = ["inspect_checkpoint", "tensor_stats"]


def _earlier_versions(ck: Checkpoint) -> int:
    """How many earlier versions in-place edits left inside a single torch zip file (restorable)."""
    from .errors import LoadError, WriteError
    from .io.torchfile import zip_layout

    try:
        if not os.path.isfile(ck.path) or not zip_layout(ck.path).versions:
            return 0  # (the parse found no chain of earlier versions: none can verify; nothing more read)
    except (OSError, LoadError):
        return 0
    from .io.append import versions
    from .io.write import appends_in_place

    if not appends_in_place(ck.path):
        return 0

    try:
        return len(versions(ck.path)) - 1
    except (OSError, WriteError):
        return 0


def inspect_checkpoint(ck: Checkpoint, *, stats: bool = False) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain JSON-able data."""
    if stats:
        from .io.readguard import forget_mappings

        forget_mappings()  # mappings of earlier loads in this process may have been reused since
    with gc_paused():  # a row per index, all kept: cycle collections would rescan the growing report again and again
        return _report(ck, stats)


def _report(ck: Checkpoint, stats: bool) -> dict[str, Any]:
    return {
        "path": ck.path,
        "layout": ck.layout,
        "saved_on": list(ck.saved_locations),
        "earlier_versions": _earlier_versions(ck),
        "parts": [{"file": p.relpath, "kind": p.kind, "bytes": p.nbytes} for p in ck.parts],
        "models": [_model_report(m, stats) for m in ck.models],
        "optimizers": [_optimizer_report(o, stats, resolve(ck, o).mapping) for o in ck.optimizers],
        "schedulers": [_scheduler_report(s) for s in ck.schedulers],
        "extras": jsonable(ck.extras),
        "other_keys": dict(ck.other_keys),
        "objects": [_object_report(k, v) for k, v in ck.objects.items()],
        "notes": list(ck.notes),
        "opaque": [
            {"file": o.part, "bytes": o.nbytes, "reason": o.reason, "unsafe_globals": list(o.unsafe_globals)}
            for o in ck.opaque
        ],
    }


def _object_report(key: str, obj: Any) -> dict[str, Any]:
    """A pickled object read as a placeholder: its type and, where they are plain data, its fields."""
    fields = fields_of(obj)
    return {
        "key": key,
        "type": obj.type_name,
        "kind": "model" if is_module_object(obj) else ("call" if obj.is_call else "object"),
        "summary": describe(obj),
        "fields": None if fields is None or is_module_object(obj) else {k: _plain(v) for k, v in fields.items()},
    }


def _plain(v: Any) -> Any:
    """A field value as JSON-able data: plain values as they are, the rest described (bounded)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return jsonable(v)
    if isinstance(v, (list, tuple)) and len(v) <= 16 and all(isinstance(x, (bool, int, float, str)) or x is None
                                                             for x in v):
        return jsonable(v)
    return describe(v)


def _model_report(m: ModelState, stats: bool) -> dict[str, Any]:
    dtypes = Counter(meta.dtype for meta in m.meta.values())
    tensors: list[dict[str, Any]] = []
    tied = m.tied
    for name, meta in m.meta.items():
        row: dict[str, Any] = {"name": name, "shape": list(meta.shape), "dtype": meta.dtype, "bytes": meta.nbytes}
        if name in tied:
            row["tied_to"] = tied[name]
        if stats:
            row["stats"] = tensor_stats(m.tensors[name])
        tensors.append(row)
    if not stats:  # plain JSON data already (checked): to_json hands the rows on as they are
        tensors = plain_rows(tensors)
    return {
        "name": m.name,
        "num_tensors": len(m.meta),
        "bytes": m.nbytes,
        "dtypes": dict(dtypes),
        "order_trusted": m.order_trusted,
        "tensors": tensors,
    }


def _state_shape_summary(entry: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if type(v) is RecordTensor:  # (the usual value, tested by type first: a summary per parameter)
            shape = v.shape
            out[k] = list(shape) if shape else v.item()  # (0-d: one element)
        elif is_tensor(v):
            out[k] = v.item() if v.ndim == 0 and v.numel() == 1 else list(v.shape)
        elif hasattr(v, "shape") and hasattr(v, "load"):  # a DCP tensor still on disk: metadata only
            out[k] = list(v.shape) if v.shape else "scalar"
        elif isinstance(v, (int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = f"list ({len(v)} items)"
        else:
            out[k] = describe(v)
    return out


def _optimizer_report(o: OptimizerState, stats: bool, mapping: OptimizerMapping) -> dict[str, Any]:
    """One optimizer's report: a row per index. Work per index is a few lookups: what depends on an
    entry's contents (its state summary, keys, step) is computed once per distinct entry object, and
    rows of one entry share its summary (a DeepSpeed file's zero-size parameters share one state dict
    per shape: 300k rows, a few summaries)."""
    groups = o.groups
    raw_groups = o.state_dict.get("param_groups", [])
    state = o.state
    nonfinite = 0
    entries = []
    no_state: dict[str, Any] = {}
    summaries: dict[int, dict[str, Any]] = {}  # id(entry) -> its summary, in the order first met
    firsts: dict[int, Mapping[str, Any]] = {}  # id(entry) -> the entry
    times: Counter[int] = Counter()  # id(entry) -> how many indices hold it
    in_groups = 0
    with_state = 0
    ambiguous = sum(e.name is None for e in mapping.entries)  # (counted here: the naming code is entered once)
    entries_of = mapping.entries
    if list(map(itemgetter(0), entries_of)) == list(chain.from_iterable(g.params for g in groups)):
        # the mapping in group order (the usual case): each of its entries is let go once its row is made
        # (this mapping is this report's own), so a report of 300k indices never holds both in full
        named: Iterator[IndexName | None] = _drain(entries_of)
        known: dict[Any, IndexName] | None = None
    else:
        named = iter(())
        known = {x.index: x for x in entries_of}
    for g in groups:
        n = len(g.params)
        sts = list(map(state.get, g.params))  # (None: no state)
        ids = list(map(id, sts))
        for k, st in dict(zip(ids, sts)).items():  # each distinct entry (in the order first met) once
            if k not in summaries:
                st = no_state if st is None else st
                summaries[k] = _state_shape_summary(st)
                firsts[k] = st
        times.update(ids)
        in_groups += n - sts.count(None)
        with_state += sum(map(bool, sts))
        names = g.param_names
        param_names = chain(names[:n], repeat(None, n - len(names))) if names else repeat(None, n)
        rows: list[dict[str, Any]] = [{"index": idx,
                 "group": g.position,
                 "param_name": pn,
                 "inferred_name": e.name if e is not None else None,
                 "candidates": list(e.candidates) if e is not None and e.name is None else [],
                 "evidence": e.evidence if e is not None else None,
                 "state": summary}
                for idx, pn, e, summary in zip(g.params, param_names,
                                               named if known is None else map(known.get, g.params),
                                               map(summaries.__getitem__, ids))]
        if stats:
            for row, st in zip(rows, sts):
                st = no_state if st is None else st
                row["stats"] = {k: tensor_stats(v.load() if _on_disk(v) else v) for k, v in st.items()
                                if (is_tensor(v) or _on_disk(v)) and len(v.shape)}
                nonfinite += sum(s["nan"] + s["inf"] for s in row["stats"].values())
        entries.extend(rows)
    key_counts: Counter[str] = Counter()
    lo = hi = None
    if len(times) == len(firsts) and all(n == 1 for n in times.values()):  # (each entry held by one index)
        key_counts.update(chain.from_iterable(firsts.values()))  # (C level, the same counts in the same order)
    else:
        for k, first in firsts.items():
            for key in first:
                key_counts[key] += times[k]
    for k, first in firsts.items():  # (first met first: the same key order, and min / max, as a walk of every index)
        raw = first.get("step")
        # a 0-d record tensor's value is in its summary already (read once)
        step = float(summaries[k]["step"]) if type(raw) is RecordTensor and not raw.shape else _step(raw)
        if step is not None:
            lo = step if lo is None or step < lo else lo
            hi = step if hi is None or step > hi else hi
    if in_groups == len(state):  # (validate_optimizer refuses an index listed twice)
        orphans: list[Any] = []
    else:
        grouped = {idx for g in groups for idx in g.params}
        orphans = [k for k in state if k not in grouped]
    report: dict[str, Any] = {
        "name": o.name,
        "class": guess_optimizer(raw_groups),
        "num_params": o.num_params,
        "num_with_state": with_state,
        "has_param_names": bool(groups) and all(g.param_names is not None for g in groups),
        "name_evidence": mapping.evidence,
        "name_source_model": mapping.model,
        "ambiguous": ambiguous,
        "notes": list(mapping.notes),
        "state_keys": dict(key_counts),
        "step": [lo, hi] if lo is not None else None,
        "groups": [
            {"group": g.position, "size": len(g.params), "hparams": jsonable(g.hparams),
             "next_lr": jsonable(g.hparams.get("lr")),
             "param_names": list(g.param_names) if g.param_names is not None else None}
            for g in groups
        ],
        "entries": plain_rows(entries),  # (plain JSON data already, checked: to_json need not copy it)
        "orphan_state_indices": jsonable(orphans),
    }
    if stats:
        report["nonfinite_state_values"] = nonfinite
    return report


def _drain(entries: list[IndexName]) -> Iterator[IndexName | None]:
    """The entries in order, each dropped from ``entries`` as it is handed out (left empty)."""
    for k in range(len(entries)):
        e = entries[k]
        entries[k] = None  # type: ignore[call-overload]
        yield e
    entries.clear()


def _step(step: Any) -> float | None:
    if is_tensor(step) and step.numel() == 1:
        return float(step.item())
    if isinstance(step, (int, float)):
        return float(step)
    return None


def _on_disk(v: Any) -> bool:
    """A DCP optimizer tensor still on disk (read only for ``--stats``, one at a time)."""
    return not is_tensor(v) and hasattr(v, "load") and hasattr(v, "shape")


def _scheduler_report(s: SchedulerState) -> dict[str, Any]:
    sd = s.state_dict
    out: dict[str, Any] = {
        "name": s.name,
        "type": guess_scheduler(sd),
        "last_epoch": jsonable(sd.get("last_epoch")),
        "base_lrs": jsonable(sd.get("base_lrs")),
        "last_lr": jsonable(sd.get("_last_lr")),
    }
    if "_schedulers" in sd and isinstance(sd["_schedulers"], list):
        out["children"] = [
            {"type": guess_scheduler(c), "last_epoch": jsonable(c.get("last_epoch"))}
            for c in sd["_schedulers"] if isinstance(c, Mapping)
        ]
    return out


_CHUNK = 1 << 22


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """min / max / mean / L2 norm and NaN / Inf counts, in chunks (bounded extra memory; tensors
    memory-mapped from a file are read into private buffers, never through the mapping)."""
    import torch

    n = t.numel()
    if n == 0 or not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                          torch.uint8, torch.bool)):
        return {"min": None, "max": None, "mean": None, "norm": None, "nan": 0, "inf": 0}
    from .io.readguard import chunks

    lo, hi, total, sq, nan, inf = math.inf, -math.inf, 0.0, 0.0, 0, 0
    for piece in chunks(t, _CHUNK):  # mapped bytes read with pread: a shortened file is an error, not a SIGBUS
        c = piece.to(torch.float64)
        bad_nan = torch.isnan(c)
        bad_inf = torch.isinf(c)
        nan += int(bad_nan.sum())
        inf += int(bad_inf.sum())
        finite = c[~(bad_nan | bad_inf)]
        if finite.numel():
            lo = min(lo, float(finite.min()))
            hi = max(hi, float(finite.max()))
            total += float(finite.sum())
            sq += float((finite * finite).sum())
    good = n - nan - inf
    return {
        "min": lo if good else None,
        "max": hi if good else None,
        "mean": total / good if good else None,
        "norm": math.sqrt(sq),
        "nan": nan,
        "inf": inf,
    }
