"""``optckpt diff``: what changed between two checkpoints — model tensors, optimizer state by
parameter **name**, param-group hyperparameters, schedulers, extras, opaque parts.

Tensors are compared one at a time, in chunks, straight from the memory-mapped files: memory stays
bounded by a chunk, never both checkpoints. Renames are found by hashing the content of the
removed / added tensors only (grouped by shape and dtype first), never by comparing all pairs."""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import math
import operator
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import compress
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, ModelState, OptimizerState, SchedulerState
from .gcpause import gc_paused
from .io.safepickle import describe, fields_of, same
from .kinds import guess_scheduler
from .mapping import OptimizerMapping
from .resolve import resolve
from .tensors import RecordTensor, is_tensor, materialize, view_key
from .verify import bit_equal, equal_pairs  # (memcmp of two file mappings' bytes)

if TYPE_CHECKING:
    import torch

__all__ = ["Entry", "DiffReport", "diff_checkpoints", "compare_tensors", "SECTIONS"]

SECTIONS = ("model", "optimizer", "param_groups", "scheduler", "extra")
_CHUNK = 1 << 20
_INLINE = 1 << 20  # tensors of fewer bytes (both sides) are compared in the calling thread


@dataclass
class Entry:
    section: str
    name: str
    key: str | None
    status: str
    a: Any = None
    b: Any = None
    max_abs_diff: float | None = None
    rel_l2: float | None = None
    renamed_from: str | None = None
    stats: dict[str, Any] | None = None

    def magnitude(self) -> float:
        if self.status in ("added", "removed", "shape_changed", "dtype_changed"):
            return math.inf
        return self.max_abs_diff if self.max_abs_diff is not None else 0.0

    def as_json(self) -> dict[str, Any]:
        from .render import jsonable

        out = {"section": self.section, "name": self.name, "key": self.key, "status": self.status,
               "a": jsonable(self.a), "b": jsonable(self.b), "max_abs_diff": self.max_abs_diff,
               "rel_l2": self.rel_l2, "renamed_from": self.renamed_from}
        if self.stats is not None:
            out["stats"] = self.stats
        return out


@dataclass
class DiffReport:
    a: str
    b: str
    entries: list[Entry] = field(default_factory=list)
    compared: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.entries

    def as_json(self) -> dict[str, Any]:
        return {"identical": self.identical, "entries": [e.as_json() for e in self.entries],
                "a": self.a, "b": self.b, "compared": self.compared, "notes": self.notes}


@dataclass(frozen=True)
class TensorDiff:
    equal_within_tol: bool
    max_abs_diff: float
    rel_l2: float
    cosine: float | None
    changed_elements: int
    bit_identical: bool


def compare_tensors(a: torch.Tensor, b: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0,
                    device: str | None = None) -> TensorDiff:
    """Max |b−a|, ‖b−a‖/‖a‖, cosine and the elements beyond ``atol + rtol·|a|`` (NaN ≠ anything but
    NaN). Bit-identical tensors cost one integer comparison pass (≈ reading both); only tensors that
    differ get the second, numeric pass, chunked so that extra memory stays a few chunks. Tensors read
    lazily are compared in the files' mappings and read by torch only when they differ."""
    if a.numel() == 0 or bit_equal(a, b):
        return TensorDiff(True, 0.0, 0.0, 1.0 if a.numel() else None, 0, True)
    import torch

    a, b = materialize(a), materialize(b)
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.numel()
    max_abs, d2, a2, b2, ab, changed = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    for start in range(0, n, _CHUNK):
        ca, cb = fa[start:start + _CHUNK], fb[start:start + _CHUNK]
        if device:
            ca, cb = ca.to(device, non_blocking=True), cb.to(device, non_blocking=True)
        xa, xb = ca.to(acc), cb.to(acc)
        both_nan = torch.isnan(xa) & torch.isnan(xb)
        d = torch.where(both_nan, torch.zeros_like(xa), xb - xa)
        ad = d.abs()
        max_abs = max(max_abs, float(torch.nan_to_num(ad, nan=math.inf).max()))
        changed += int((~(ad <= atol + rtol * xa.abs()) & ~both_nan).sum())
        d2 += float(torch.linalg.vector_norm(torch.nan_to_num(d, nan=math.inf), dtype=torch.float64)) ** 2
        za, zb = torch.nan_to_num(xa), torch.nan_to_num(xb)
        a2 += float(torch.linalg.vector_norm(za, dtype=torch.float64)) ** 2
        b2 += float(torch.linalg.vector_norm(zb, dtype=torch.float64)) ** 2
        ab += float(torch.dot(za.double(), zb.double())) if acc == torch.float64 else float(torch.dot(za, zb))
    na = math.sqrt(a2)
    rel = math.sqrt(d2) / na if na > 0 else (0.0 if d2 == 0 else math.inf)
    cos = ab / (na * math.sqrt(b2)) if na > 0 and b2 > 0 else None
    return TensorDiff(changed == 0, max_abs, rel, cos, changed, False)


def _digest(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    raw_view = t.contiguous_bytes() if type(t) is RecordTensor else None
    if raw_view is not None and t.dtype.name != "bool":  # read lazily: hashed in the file's mapping
        step = _CHUNK * 4
        for start in range(0, len(raw_view), step):
            h.update(raw_view[start:start + step])
        return h.hexdigest()
    import torch

    t = materialize(t)
    flat = t.contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() and flat.dtype != torch.bool else flat.to(torch.uint8)
    step = _CHUNK * 4
    for start in range(0, raw.numel(), step):
        piece = raw[start:start + step]
        h.update(ctypes.string_at(piece.data_ptr(), piece.numel()))  # no numpy needed
    return h.hexdigest()


def _selected(name: str, params: Sequence[str]) -> bool:
    return not params or any(fnmatch.fnmatchcase(name, p) for p in params)


def _data_models(ck: Checkpoint) -> list[ModelState]:
    return [m for m in ck.models if len(m.tensors) == len(m.meta)]


def _pair_models(a: Checkpoint, b: Checkpoint) -> list[tuple[ModelState, ModelState]]:
    ma, mb = _data_models(a), _data_models(b)
    if not ma or not mb:
        return []
    by_name = {m.name: m for m in mb}
    pairs = [(m, by_name[m.name]) for m in ma if m.name in by_name]
    return pairs if pairs and len(ma) > 1 else [(ma[0], mb[0])]


def _mapped(a: Checkpoint, b: Checkpoint) -> bool:
    """Tensors of both sides already addressable (memory-mapped files), so comparing several at a
    time costs no memory: not DCP, whose tensors are read from the shards one entry at a time."""
    return a.layout != "dcp" and b.layout != "dcp"


class _Lanes:
    """Runs the tensor comparisons of a section on every core (``memcmp`` and torch's kernels run
    without the GIL), a bounded number in flight, their entries kept in the order they were added;
    the progress hook is called from this thread."""

    def __init__(self, report: DiffReport, progress: Callable[[int], None], *, parallel: bool) -> None:
        self.report, self.progress = report, progress
        workers = min(os.cpu_count() or 1, 8) if parallel else 1
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self.depth = 4 * workers
        self.pending: deque[tuple[int, Future[Entry | None], int]] = deque()
        # (compare, entry, nbytes, record pair): comparisons and entries waiting for a bulk comparison
        self.queue: list[tuple[Callable[[], Entry | None] | None, Entry | None, int,
                               tuple[RecordTensor, RecordTensor] | None]] = []

    def entry(self, e: Entry) -> None:
        """An entry found without comparing tensors, kept in its place among the queued comparisons."""
        if self.queue:
            self.queue.append((None, e, 0, None))
        else:
            self.report.entries.append(e)

    def add(self, compare: Callable[[], Entry | None], nbytes: int,
            records: tuple[RecordTensor, RecordTensor] | None = None) -> None:
        """One comparison, in order. ``records``: the two tensors are record tensors of files, queued
        and first compared in bulk (:func:`_identical`): only those whose bytes may differ are compared
        one by one (600k tiny tensors: a few ``memcmp`` of whole runs of records, not 600k)."""
        if records is not None or self.queue:
            self.queue.append((compare, None, nbytes, records))
            if len(self.queue) >= _QUEUE:
                self.flush()
            return
        self._add(compare, nbytes)

    def flush(self) -> None:
        """The queued comparisons and entries, in order: pairs proven bit-identical in bulk (which
        every comparison would find equal: no entry) only count as progress."""
        queue, self.queue = self.queue, []
        same = iter(_identical([r for _, _, _, r in queue if r is not None]))
        for compare, e, nbytes, records in queue:
            if compare is None:
                self.report.entries.append(e)  # type: ignore[arg-type]
            elif records is not None and next(same):
                self.progress(nbytes)
            else:
                self._add(compare, nbytes)

    def _add(self, compare: Callable[[], Entry | None], nbytes: int) -> None:
        if self.pool is None or nbytes < _INLINE:  # a task per small tensor costs more than comparing it
            e = compare()
            self.progress(nbytes)
            if e is not None:
                self.report.entries.append(e)
            return
        self.pending.append((len(self.report.entries), self.pool.submit(compare), nbytes))
        self.report.entries.append(None)  # type: ignore[arg-type]  # its slot, filled in by _one
        while len(self.pending) > self.depth:
            self._one()

    def _one(self) -> None:
        slot, fut, nbytes = self.pending.popleft()
        self.report.entries[slot] = fut.result()  # type: ignore[assignment]
        self.progress(nbytes)

    def close(self) -> None:
        try:
            self.flush()
            while self.pending:
                self._one()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)
        self.report.entries[:] = [e for e in self.report.entries if e is not None]


_QUEUE = 1 << 16  # comparisons queued for one bulk comparison (bounded memory)


def _records(ta: Any, tb: Any) -> tuple[RecordTensor, RecordTensor] | None:
    """Both tensors as record tensors (not read), for the bulk comparison; None otherwise."""
    return (ta, tb) if type(ta) is RecordTensor and type(tb) is RecordTensor else None


def _identical(pairs: Sequence[tuple[RecordTensor, RecordTensor]]) -> list[bool]:
    """For each pair of record tensors: proven bit-identical, i.e. the same view (shape, dtype,
    stride, storage offset) of storages of the same size whose bytes are equal (False: not proven;
    the pair is compared as any other). Storages are compared in runs (:func:`~optckpt.verify.equal_pairs`): what
    lies between records (zip headers) is compared too, where a difference only proves less."""
    firsts, seconds = list(map(_FIRST, pairs)), list(map(_SECOND, pairs))
    same_view = list(compress(range(len(pairs)), map(operator.eq, map(view_key, firsts), map(view_key, seconds))))
    out = [False] * len(pairs)
    proven = equal_pairs(list(map(firsts.__getitem__, same_view)), list(map(seconds.__getitem__, same_view)))
    for i in compress(same_view, proven):
        out[i] = True
    return out


_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


def _tensor_entry(section: str, name: str, key: str | None, ta: torch.Tensor, tb: torch.Tensor, atol: float,
                  rtol: float, stats: bool, device: str | None) -> Entry | None:
    if tuple(ta.shape) != tuple(tb.shape):
        return Entry(section, name, key, "shape_changed", list(ta.shape), list(tb.shape))
    if ta.dtype != tb.dtype:
        return Entry(section, name, key, "dtype_changed", str(ta.dtype).removeprefix("torch."),
                     str(tb.dtype).removeprefix("torch."))
    if ta.numel() == 1 and ta.ndim == 0:
        va, vb = ta.item(), tb.item()
        same = va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb))
        if same or (isinstance(va, (int, float)) and abs(vb - va) <= atol + rtol * abs(va)):
            return None
        return Entry(section, name, key, "changed", va, vb, max_abs_diff=float(abs(vb - va)))
    d = compare_tensors(ta, tb, atol=atol, rtol=rtol, device=device)
    if d.equal_within_tol:
        return None
    e = Entry(section, name, key, "changed", max_abs_diff=d.max_abs_diff, rel_l2=d.rel_l2)
    if stats:
        e.stats = {"cosine": d.cosine, "changed_elements": d.changed_elements, "numel": ta.numel()}
    return e


def _diff_models(a: Checkpoint, b: Checkpoint, atol: float, rtol: float, params: Sequence[str], stats: bool,
                 device: str | None, report: DiffReport, progress: Callable[[int], None]) -> dict[str, str]:
    """Model tensors; returns the renames found (old name → new name) for the optimizer section."""
    renames: dict[str, str] = {}
    count = 0
    lanes = _Lanes(report, progress, parallel=_mapped(a, b))
    several = len(_data_models(a)) > 1 or len(_data_models(b)) > 1  # timm's state_dict + state_dict_ema
    for ma, mb in _pair_models(a, b):
        prefix = f"{ma.name}:" if several else ""
        names_a = [n for n in ma.meta if _selected(n, params)]
        names_b = [n for n in mb.meta if _selected(n, params)]
        set_a, set_b = set(names_a), set(names_b)
        removed = [n for n in names_a if n not in set_b]
        added = [n for n in names_b if n not in set_a]
        by_key: dict[tuple[Any, ...], list[str]] = {}
        for n in added:
            by_key.setdefault((mb.meta[n].shape, mb.meta[n].dtype), []).append(n)
        added_hash: dict[str, str] = {}
        for n in removed:
            cands = by_key.get((ma.meta[n].shape, ma.meta[n].dtype), [])
            if not cands:
                continue
            h = _digest(ma.tensors[n])
            for c in cands:
                if c not in added_hash:
                    added_hash[c] = _digest(mb.tensors[c])
                if added_hash[c] == h and c not in renames.values():
                    renames[n] = c
                    break
        for n in removed:
            if n in renames:
                report.entries.append(Entry("model", prefix + renames[n], None, "renamed", renamed_from=prefix + n))
            else:
                report.entries.append(Entry("model", prefix + n, None, "removed", list(ma.meta[n].shape), None))
        for n in added:
            if n not in renames.values():
                report.entries.append(Entry("model", prefix + n, None, "added", None, list(mb.meta[n].shape)))
        for n in names_a:
            if n not in set_b:
                continue
            count += 1
            ta, tb = ma.tensors[n], mb.tensors[n]
            lanes.add(partial(_tensor_entry, "model", prefix + n, None, ta, tb, atol, rtol, stats, device),
                      ma.meta[n].nbytes + mb.meta[n].nbytes, _records(ta, tb))
    lanes.close()
    report.compared["model"] = count
    return renames


def _hp_entries(section: str, name: str, ha: Mapping[str, Any], hb: Mapping[str, Any], skip: Iterable[str] = (),
                atol: float = 0.0, rtol: float = 0.0, prefix: str = "") -> list[Entry]:
    """One entry per changed key; nested state (a ``SequentialLR``'s ``_schedulers``, a nested extra)
    one entry per changed path (``_schedulers.1.last_epoch``), not one cell holding the whole dict."""
    out = []
    skip = set(skip)
    for k in [*ha, *[k for k in hb if k not in ha]]:
        if k in skip:
            continue
        key = f"{prefix}{k}"
        if k not in hb:
            out.append(Entry(section, name, key, "removed", ha[k], None))
        elif k not in ha:
            out.append(Entry(section, name, key, "added", None, hb[k]))
        elif _same_value(ha[k], hb[k], atol, rtol):
            continue
        elif isinstance(ha[k], Mapping) and isinstance(hb[k], Mapping):
            out.extend(_hp_entries(section, name, ha[k], hb[k], (), atol, rtol, f"{key}."))
        elif isinstance(ha[k], (list, tuple)) and isinstance(hb[k], (list, tuple)) and len(ha[k]) == len(hb[k]) \
                and any(isinstance(v, Mapping) for v in ha[k]):
            out.extend(_hp_entries(section, name, {str(i): v for i, v in enumerate(ha[k])},
                                   {str(i): v for i, v in enumerate(hb[k])}, (), atol, rtol, f"{key}."))
        else:
            diff = None
            if isinstance(ha[k], (int, float)) and isinstance(hb[k], (int, float)) and not isinstance(ha[k], bool):
                diff = float(abs(hb[k] - ha[k]))
            out.append(Entry(section, name, key, "changed", ha[k], hb[k], max_abs_diff=diff))
    return out


def _same_value(x: Any, y: Any, atol: float = 0.0, rtol: float = 0.0) -> bool:
    if is_tensor(x) or is_tensor(y):
        if is_tensor(x) and is_tensor(y):
            return (x.shape == y.shape and x.dtype == y.dtype
                    and compare_tensors(x, y, atol=atol, rtol=rtol).equal_within_tol)
        return False
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same_value(p, q, atol, rtol) for p, q in zip(x, y))
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        return x.keys() == y.keys() and all(_same_value(x[k], y[k], atol, rtol) for k in x)
    if isinstance(x, float) and isinstance(y, float):
        if math.isnan(x) and math.isnan(y):
            return True
        return x == y or abs(y - x) <= atol + rtol * abs(x)
    try:
        return bool(x == y)
    except Exception:
        return repr(x) == repr(y)


def _pair_optimizers(a: Checkpoint, b: Checkpoint) -> list[tuple[OptimizerState, OptimizerState]]:
    if len(a.optimizers) == 1 and len(b.optimizers) == 1:
        return [(a.optimizers[0], b.optimizers[0])]
    by_name = {o.name: o for o in b.optimizers}
    return [(o, by_name[o.name]) for o in a.optimizers if o.name in by_name]


def _names(m: OptimizerMapping, renames: Mapping[str, str]) -> dict[str, int]:
    out = {}
    for e in m.entries:
        name = e.name if e.name is not None else f"<index {e.index}>"
        out[renames.get(name, name)] = e.index
    return out


def _members(names: Mapping[str, Any], groups: Sequence[Any]) -> dict[int, list[str]]:
    """Group position -> the sorted names of its parameters (one pass over names, not one per group)."""
    group_of = {idx: gi for gi, g in enumerate(groups) for idx in g.params}
    out: dict[int, list[str]] = {}
    for n, idx in names.items():
        gi = group_of.get(idx)
        if gi is not None:
            out.setdefault(gi, []).append(n)
    for v in out.values():
        v.sort()
    return out


def _diff_optimizers(a: Checkpoint, b: Checkpoint, atol: float, rtol: float, params: Sequence[str], stats: bool,
                     device: str | None, renames: Mapping[str, str], report: DiffReport,
                     progress: Callable[[int], None]) -> None:
    count = 0
    lanes = _Lanes(report, progress, parallel=_mapped(a, b))
    _unpaired("optimizer", a.optimizers, b.optimizers, _pair_optimizers(a, b), report)
    for oa, ob in _pair_optimizers(a, b):
        lanes.flush()  # (the entries below come after the previous optimizer's)
        label = "" if len(a.optimizers) == 1 else f"{oa.name}:"
        ma, mb = resolve(a, oa).mapping, resolve(b, ob).mapping
        if any(e.name is None for e in (*ma.entries, *mb.entries)):
            report.notes.append(f"optimizer {oa.name}: some names are uncertain; those indices compare as <index i>")
        na, nb = _names(ma, renames), _names(mb, renames)
        # param groups: hyperparameters per group (in order), and membership by name
        ga, gb = oa.groups, ob.groups
        by_group_a, by_group_b = _members(na, ga), _members(nb, gb)
        for i in range(max(len(ga), len(gb))):
            gname = f"{label}group {i}"
            if i >= len(gb):
                report.entries.append(Entry("param_groups", gname, None, "removed", len(ga[i].params), None))
                continue
            if i >= len(ga):
                report.entries.append(Entry("param_groups", gname, None, "added", None, len(gb[i].params)))
                continue
            report.entries.extend(_hp_entries("param_groups", gname, ga[i].hparams, gb[i].hparams, atol=atol,
                                              rtol=rtol))
            members_a, members_b = by_group_a.get(i, []), by_group_b.get(i, [])
            if members_a != members_b:
                report.entries.append(Entry("param_groups", gname, "params", "changed",
                                            [n for n in members_a if n not in members_b],
                                            [n for n in members_b if n not in members_a]))
        sa, sb = oa.state, ob.state
        for name in [*na, *[n for n in nb if n not in na]]:
            if not _selected(name, params):
                continue
            if name not in nb:
                if sa.get(na[name]):
                    lanes.entry(Entry("optimizer", label + name, None, "removed", sorted(sa[na[name]]), None))
                continue
            if name not in na:
                if sb.get(nb[name]):
                    lanes.entry(Entry("optimizer", label + name, None, "added", None, sorted(sb[nb[name]])))
                continue
            ea, eb = _materialized(sa.get(na[name], {})), _materialized(sb.get(nb[name], {}))
            count += 1
            for key in [*ea, *[k for k in eb if k not in ea]]:
                if key not in eb:
                    lanes.entry(Entry("optimizer", label + name, key, "removed", _short(ea[key]), None))
                elif key not in ea:
                    lanes.entry(Entry("optimizer", label + name, key, "added", None, _short(eb[key])))
                elif is_tensor(ea[key]) and is_tensor(eb[key]):
                    lanes.add(partial(_tensor_entry, "optimizer", label + name, key, ea[key], eb[key], atol, rtol,
                                      stats, device), ea[key].numel() * ea[key].element_size() * 2,
                              _records(ea[key], eb[key]))
                elif not _same_value(ea[key], eb[key], atol, rtol):
                    lanes.entry(Entry("optimizer", label + name, key, "changed", _short(ea[key]),
                                                _short(eb[key])))
    lanes.close()
    report.compared["optimizer"] = count


def _materialized(entry: Mapping[str, Any]) -> dict[str, Any]:
    """State entry values with DCP tensors still on disk read in (one entry at a time)."""
    return {k: v if type(v) is RecordTensor or not (hasattr(v, "load") and hasattr(v, "key")) else v.load()
            for k, v in entry.items()}


def _short(v: Any) -> Any:
    if is_tensor(v):
        return v.item() if v.numel() == 1 else f"tensor{tuple(v.shape)}"
    return v


_SCHED_KEYS = ("last_epoch", "base_lrs", "_last_lr", "_step_count")


def _pair_schedulers(a: Checkpoint, b: Checkpoint) -> list[tuple[SchedulerState, SchedulerState]]:
    if len(a.schedulers) == 1 and len(b.schedulers) == 1:
        return [(a.schedulers[0], b.schedulers[0])]
    by_name = {s.name: s for s in b.schedulers}
    return [(s, by_name[s.name]) for s in a.schedulers if s.name in by_name]


def _unpaired(section: str, xs: Sequence[Any], ys: Sequence[Any], pairs: Sequence[tuple[Any, Any]],
              report: DiffReport) -> None:
    paired_a, paired_b = {id(p[0]) for p in pairs}, {id(p[1]) for p in pairs}
    for x in xs:
        if id(x) not in paired_a:
            report.entries.append(Entry(section, x.name, None, "removed"))
    for y in ys:
        if id(y) not in paired_b:
            report.entries.append(Entry(section, y.name, None, "added"))


def _diff_schedulers(a: Checkpoint, b: Checkpoint, atol: float, rtol: float, report: DiffReport) -> None:
    _unpaired("scheduler", a.schedulers, b.schedulers, _pair_schedulers(a, b), report)
    for sa, sb in _pair_schedulers(a, b):
        ta, tb = guess_scheduler(sa.state_dict), guess_scheduler(sb.state_dict)
        if ta != tb:
            report.entries.append(Entry("scheduler", sa.name, "type", "changed", ta, tb))
        report.entries.extend(_hp_entries("scheduler", sa.name, sa.state_dict, sb.state_dict,
                                          skip=("_get_lr_called_within_step", "_is_initial", "verbose"),
                                          atol=atol, rtol=rtol))
    report.compared["scheduler"] = len(_pair_schedulers(a, b))


def _diff_extras(a: Checkpoint, b: Checkpoint, report: DiffReport) -> None:
    report.entries.extend(_hp_entries("extra", "extras", a.extras, b.extras))
    for key in [*a.objects, *[k for k in b.objects if k not in a.objects]]:
        report.entries.extend(_object_entries(key, a.objects.get(key), b.objects.get(key)))
    parts_b = {p.relpath: p for p in b.parts}
    for o in a.opaque:
        pb = parts_b.get(o.part)
        if pb is None:
            continue
        fa, fb = os.path.join(a.path, o.part), os.path.join(b.path, o.part)
        if os.path.isfile(fa) and os.path.isfile(fb) and _file_digest(fa) != _file_digest(fb):
            report.entries.append(Entry("extra", o.part, None, "changed", o.nbytes, pb.nbytes))
    report.compared["extra"] = len(a.extras)


def _object_entries(key: str, oa: Any, ob: Any) -> list[Entry]:
    """A pickled object (``args``) on either side: its fields compared by name, as data."""
    if oa is None or ob is None:
        return [Entry("extra", key, None, "added" if oa is None else "removed",
                      None if oa is None else oa.type_name, None if ob is None else ob.type_name)]
    if oa.type_name != ob.type_name:
        return [Entry("extra", key, "type", "changed", oa.type_name, ob.type_name)]
    fa, fb = fields_of(oa), fields_of(ob)
    if fa is not None and fb is not None:
        return [_described(e) for e in _hp_entries("extra", key, fa, fb)]
    return [] if same(oa, ob) else [Entry("extra", key, None, "changed", describe(oa), describe(ob))]


def _described(e: Entry) -> Entry:
    plain = (bool, int, float, str, type(None))
    e.a = e.a if isinstance(e.a, plain) else describe(e.a)
    e.b = e.b if isinstance(e.b, plain) else describe(e.b)
    return e


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def diff_checkpoints(a: Checkpoint, b: Checkpoint, *, atol: float = 0.0, rtol: float = 0.0,
                     only: Sequence[str] = (), params: Sequence[str] = (), stats: bool = False,
                     device: str | None = None, progress: Callable[[int], None] | None = None) -> DiffReport:
    """Everything that differs between ``a`` and ``b`` beyond ``atol + rtol·|a|``."""
    with gc_paused():  # (a few objects a tensor, no cycles: a collection meanwhile would rescan both checkpoints)
        return _diff(a, b, atol=atol, rtol=rtol, only=only, params=params, stats=stats, device=device,
                     progress=progress)


def _diff(a: Checkpoint, b: Checkpoint, *, atol: float, rtol: float, only: Sequence[str], params: Sequence[str],
          stats: bool, device: str | None, progress: Callable[[int], None] | None) -> DiffReport:
    report = DiffReport(a.path, b.path)
    tick = progress or (lambda n: None)
    want = set(only) or set(SECTIONS)
    renames: dict[str, str] = {}
    if "model" in want or "optimizer" in want:
        renames = _diff_models(a, b, atol, rtol, params, stats, device, report, tick)
        if "model" not in want:
            report.entries = [e for e in report.entries if e.section != "model"]
    if "optimizer" in want or "param_groups" in want:  # --only optimizer includes its param groups
        _diff_optimizers(a, b, atol, rtol, params, stats, device, renames, report, tick)
        if "optimizer" not in want:
            report.entries = [e for e in report.entries if e.section != "optimizer"]
    if "scheduler" in want:
        _diff_schedulers(a, b, atol, rtol, report)
    if "extra" in want:
        _diff_extras(a, b, report)
    return report


def total_bytes(a: Checkpoint, b: Checkpoint) -> int:
    """The tensor bytes a diff will read (for the progress bar)."""
    n = sum(m.nbytes for m in _data_models(a)) + sum(m.nbytes for m in _data_models(b))
    for ck in (a, b):
        for o in ck.optimizers:
            for entry in o.state.values():
                n += sum(v.numel() * v.element_size() for v in entry.values() if is_tensor(v))
    return n
