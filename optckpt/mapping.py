"""Name every optimizer index: which parameter does ``state[7]`` belong to, and how sure are we.

Evidence, strongest first:

* ``param_names`` saved in the param groups (torch >= 2.6 named optimizers) — exact;
* names supplied by the caller (the old code via ``--source``, a names file) — exact;
* alignment against a model state dict saved in **registration order** (pickled ``state_dict()``):
  every param group is an ordered subsequence of the model's parameters, the shapes of its state
  tensors pin each index (:mod:`optckpt.align`) — exact where forced, ``ambiguous`` otherwise;
* single-parameter groups carrying a ``name`` key (3D Gaussian Splatting) when no model is saved;
* shapes alone, when the model order is not trustworthy (safetensors): only shape-unique indices;
* the new code's grouping (:func:`settle_by_grouping`, needs the target's optimizer): weakest, used
  only on what the rest leaves ambiguous, assuming the grouping rule is unchanged: ``group-order``
  when every group holds one parameter and the new code's groups follow its model's order (mmengine
  ``paramwise_cfg``, layer-wise lr decay: the old groups are then taken to follow the old model's),
  else ``group-structure`` (each old group's indices are parameters of its new counterpart).

Every index records the rung that named it (``IndexName.evidence``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, repeat
from typing import Any, NamedTuple

from .align import Item, Slot, align_groups
from .checkpoint import _FLOATING, Checkpoint, ModelState, OptimizerState
from .gcpause import gc_paused
from .kinds import PARAM_SHAPED_KEYS
from .tensors import RecordTensor, is_tensor
from .validate import validate_optimizer

__all__ = ["IndexName", "OptimizerMapping", "SourceNames", "Rejection", "param_shape", "infer_mapping", "is_lbfgs",
           "pair_groups", "settle_by_grouping", "name_by_target_shapes"]

# exact types that are plain data or a record tensor: never a pickled object, never a Mapping (a
# per-value test by type alone; anything else, subclasses included, takes the general tests)
_PLAIN_VALUES = frozenset({type(None), bool, int, float, str, bytes, list, tuple, set, RecordTensor})
_PLAIN_OR_DICT = _PLAIN_VALUES | {dict}


def _tensors(entry: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes of an entry's tensors of at least one dimension (DCP tensors on disk too)."""
    if type(entry) is dict and _PLAIN_VALUES.issuperset(map(type, entry.values())):
        # (the usual entry: record tensors and numbers; only the record tensors have a shape)
        return {k: tuple(v.shape) for k, v in entry.items() if type(v) is RecordTensor and len(v.shape) >= 1}
    return {k: tuple(v.shape) for k, v in entry.items()
            if (is_tensor(v) or (hasattr(v, "shape") and not isinstance(v, (int, float))))
            and len(v.shape) >= 1}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def one_view(entry: Any) -> Any:
    """An entry whose tensors sit one dict down, read through for shape evidence: heavyball keeps
    each parameter's state per view of it (``{0: {...}}``), bitsandbytes its 8-bit state under
    ``__bnb_optimizer_quant_state__`` (beside ``step``). Several such dicts (a parameter split in
    blocks) stay as they are (no shape)."""
    if not isinstance(entry, Mapping):
        return entry
    if type(entry) is dict and _PLAIN_VALUES.issuperset(map(type, entry.values())):
        return entry  # no value is a Mapping
    inner = [v for v in entry.values() if isinstance(v, Mapping)]
    if len(inner) != 1:
        return entry
    return {**{k: v for k, v in entry.items() if not isinstance(v, Mapping)}, **inner[0]}


def _is_object(v: Any) -> bool:
    """A value that is not plain data: a pickled object (placeholder or, trusted, the real one)."""
    return not (v is None or isinstance(v, (int, float, str, bytes, list, tuple, dict, set)) or is_tensor(v)
                or hasattr(v, "shape"))


def param_shape(entry: Mapping[str, Any]) -> tuple[int, ...] | None:
    return _shape_and_key(entry)[0]


def _shape_and_key(entry: Mapping[str, Any]) -> tuple[tuple[int, ...] | None, str]:
    """The shape of the parameter an optimizer state entry belongs to, or None when its state
    does not reveal it (no state, scalars only, LBFGS's global state). A known moment kept flattened
    beside one tensor shape of the same size with more (non-trivial) dimensions (SPAM's ``exp_avg``
    [12] beside its ``mask`` [3, 4]) gives that shape: flattening is how optimizers store it.
    An entry holding a Python object (GaLore's projector) gives none: its moments live in the
    object's projected space (GaLore's ``exp_avg`` is [6, 2] for a [6, 4] weight)."""
    if type(entry) is dict and _PLAIN_VALUES.issuperset(map(type, entry.values())):
        # the usual entry (record tensors and numbers): the same rules, tested by type
        for k in PARAM_SHAPED_KEYS:
            v = entry.get(k)
            if type(v) is RecordTensor:
                shape = tuple(v.shape)
                if len(shape) != 1 or shape[0] < 2:
                    return shape, k
                richer = [s for s in [tuple(x.shape) for x in entry.values() if type(x) is RecordTensor
                                      and len(x.shape) >= 2] if _numel(s) == shape[0] and min(s) > 1]
                return (max(richer, key=len) if len(set(richer)) == 1 else shape), k
    elif not _PLAIN_OR_DICT.issuperset(map(type, entry.values())) and any(_is_object(v) for v in entry.values()):
        return None, ""
    else:
        return _general_shape_and_key(entry)
    return _factored_shape(entry)


def _general_shape_and_key(entry: Mapping[str, Any]) -> tuple[tuple[int, ...] | None, str]:
    for k in PARAM_SHAPED_KEYS:
        v = entry.get(k)
        if v is not None and (is_tensor(v) or hasattr(v, "shape")):  # DCP tensors on disk too
            shape = tuple(v.shape)
            if len(shape) != 1 or shape[0] < 2:
                return shape, k
            richer = [s for s in _tensors(entry).values() if _numel(s) == shape[0] and len(s) >= 2 and min(s) > 1]
            return (max(richer, key=len) if len(set(richer)) == 1 else shape), k
    return _factored_shape(entry)


def _factored_shape(entry: Mapping[str, Any]) -> tuple[tuple[int, ...] | None, str]:
    row, col = entry.get("row_var"), entry.get("col_var")
    if is_tensor(row) and is_tensor(col) and row.ndim == col.ndim >= 2:
        # Adafactor factors a (..., R, C) second moment into row_var (..., R, 1) and col_var (..., 1, C)
        return (*row.shape[:-1], col.shape[-1]), "row_var"
    return None, ""


def is_lbfgs(opt: OptimizerState) -> bool:
    groups = opt.state_dict.get("param_groups", [])
    return bool(groups) and "history_size" in groups[0] and "max_iter" in groups[0]


class IndexName(NamedTuple):
    """What is known about one optimizer index."""

    index: int  # type: ignore[assignment]  # (a field, shadowing tuple.index)
    group: int
    name: str | None  # set only when certain
    candidates: tuple[str, ...]  # every name it could be (one when certain)
    shape: tuple[int, ...] | None  # the parameter's shape as its state shows it
    has_state: bool
    evidence: str = ""  # the rung that named it (or, when uncertain, the last one that narrowed it)


@dataclass(frozen=True)
class SourceNames:
    """Names offered by the caller for the saved indices (``--source``, ``source_names=``): a claim,
    checked against the checkpoint before any of it is used (:func:`infer_mapping`).

    ``ordered``: the names are in the old optimizer's order (a names file, an optimizer, a checkpoint):
    per saved param group, or one flat list over all groups in order. Otherwise they are a model's
    parameter order (the old module without its optimizer), which says nothing about how the
    optimizer grouped them: each saved group is then aligned to it as an ordered subsequence, by the
    shapes its state shows, like the checkpoint's own model order."""

    spec: str
    groups: list[list[str]]
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    ordered: bool = True
    # the new code's shapes: checked against names neither the source nor the checkpoint gives a shape
    # (a names file beside an optimizer saved alone). A name whose new shape differs is then refused
    # rather than trusted: save the model with it (--model) to tell a reshape from a wrong name
    fallback_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


class Rejection(NamedTuple):
    """Evidence that contradicts the checkpoint, and why: it named no index."""

    evidence: str  # "source" | "param_names"
    index: Any  # the first index it contradicts (None: the whole claim, e.g. group sizes)
    reason: str


@dataclass
class OptimizerMapping:
    """The mapping of one optimizer: its indices in group order, with the evidence used."""

    optimizer: str
    evidence: str  # "param_names" | "source" | "model-order" | "group-name" | "shapes-only" | "none"
    entries: list[IndexName]
    model: str | None = None  # which model state dict(s) the alignment used
    notes: list[str] = field(default_factory=list)
    group_sizes: list[int] = field(default_factory=list)  # every saved param group, empty ones included
    group_hparams: list[dict[str, Any]] = field(default_factory=list)  # their keys but params / param_names
    # what a model-order alignment ran on (model slots, items per group), for the group-structure rung
    basis: tuple[list[Slot], list[list[Item]]] | None = field(default=None, repr=False)
    rejected: list[Rejection] = field(default_factory=list)  # evidence the consistency gate refused
    overridden: str | None = None  # OptimizerState.overridden: a layout that is not torch's (refused by remap)

    @property
    def ambiguous(self) -> list[IndexName]:
        return [e for e in self.entries if e.name is None]

    def name_of(self) -> dict[int, str]:
        return {e.index: e.name for e in self.entries if e.name is not None}


def _items(opt: OptimizerState) -> list[list[Item]]:
    shapes = _shapes(opt)
    # Item(i, shapes[i]) per index, made at C level (tuple.__new__: no Python-level __new__ per index)
    return [list(map(tuple.__new__, repeat(Item), zip(g.params, map(shapes.__getitem__, g.params))))
            for g in opt.groups]


def _distinct(entries: Any) -> dict[int, Any]:
    """The distinct entry objects among ``entries``, by id (a DeepSpeed file's zero-size parameters
    share one state dict per shape: 300k indices, a few entries, each read once)."""
    return {id(e): e for e in entries}


def _shapes(opt: OptimizerState) -> dict[Any, tuple[int, ...] | None]:
    """Every index's parameter shape as its state shows it (computed once per optimizer, and once
    per distinct entry object)."""
    cached = opt.__dict__.get("_shapes")  # kept beside the state dict it was computed from
    model_shapes = opt.__dict__.get("_model_shapes")  # set by infer_mapping: the checkpoint's parameter shapes
    if cached is not None and cached[0] is opt.state_dict and cached[2] is model_shapes:
        return cached[1]
    raw = opt.state
    distinct = _distinct(raw.values())
    views = {k: one_view(e) for k, e in distinct.items()}
    # (the index -> view mapping handed on is the state itself unless some entry is read through)
    state = raw if all(views[k] is e for k, e in distinct.items()) else {i: views[id(e)] for i, e in raw.items()}
    params = list(chain.from_iterable(g.params for g in opt.groups))
    entry_ids = list(map(id, map(state.get, params)))  # (an index without state: id(None))
    none: tuple[tuple[int, ...] | None, str] = (None, "")
    if is_lbfgs(opt):
        shapes = dict.fromkeys(params)
    else:
        # per distinct entry (its shape and the key that gave it); C-level walks over the indices
        used = dict(zip(entry_ids, map(state.get, params)))
        by_entry = {k: none if e is None else _shape_and_key(e) for k, e in used.items()}
        # a known key whose shapes are not the saved model's parameter shapes means something else in
        # this optimizer (Nero's per-row exp_avg_sq [6, 1], Amos' scalar one, SARA's empty exp_avg):
        # none of its shapes is evidence
        other = {k for s, k in by_entry.values() if s is not None and s not in model_shapes} if model_shapes else ()
        if other:
            final = {k: None if key in other else s for k, (s, key) in by_entry.items()}
        else:
            final = {k: s for k, (s, _) in by_entry.items()}
        shapes = dict(zip(params, map(final.__getitem__, entry_ids)))
        if model_shapes:
            _shapes_from_unknown_keys(state, shapes, model_shapes, opt.__dict__.get("_model_shape_counts"))
    opt.__dict__["_shapes"] = (opt.state_dict, shapes, model_shapes)
    return shapes


def _shapes_from_unknown_keys(state: Mapping[Any, Any], shapes: dict[Any, tuple[int, ...] | None],
                              model_shapes: frozenset[tuple[int, ...]],
                              model_counts: Counter[tuple[int, ...]] | None = None) -> None:
    """Optimizers whose state keys are not torch's (community libraries: A2Grad's ``avg_grad``,
    bitsandbytes' ``state1``): an entry's largest tensor is taken as parameter-shaped only when it is
    the same key in every such entry of the optimizer (a per-parameter buffer) and every shape it
    gives is the shape of some parameter of the model saved with it (corroborated: no model, no
    inference). Factored or blockwise state (row / column factors, ``absmax`` blocks) makes the
    largest key vary or have another size, so it gives no shape: no evidence rather than a wrong one.
    Each distinct entry object is read once (entries shared by many indices cost a lookup each)."""
    if None not in shapes.values():
        return  # every index's shape known: nothing to infer (what follows would find nothing to do)
    keys = list(shapes)
    ids = list(map(id, map(state.get, keys)))  # each index's entry object (C-level walks, once)
    entries = dict(zip(ids, map(state.get, keys)))
    tensors = {k: _tensors(e) if isinstance(e, Mapping) else {} for k, e in entries.items()}
    plain = {k for k, e in entries.items()
             if isinstance(e, Mapping) and e and not any(_is_object(v) for v in e.values())}
    todo = [(i, k) for i, s, k in zip(keys, shapes.values(), ids) if s is None and k in plain]
    used = {k for _, k in todo}
    # only keys every such entry has (bitsandbytes keeps its 256-entry code books qmap1 / qmap2 on
    # 8-bit entries only: never the parameter's buffer)
    common = set.intersection(*(set(tensors[k]) for k in used)) if todo else set()
    chosen: dict[int, tuple[str, tuple[int, ...]]] = {}
    for k in used:
        found = {name: v for name, v in tensors[k].items() if name in common}
        if found:
            best = max(found, key=lambda x: (_numel(found[x]), len(found[x]), x))
            chosen[k] = (best, found[best])
    # (every check below only decides whether to return: the cheap ones, per entry, first)
    if not chosen or len({name for name, _ in chosen.values()}) != 1 or len(chosen) != len(used):
        return
    for k, (_, shape) in chosen.items():
        if any(_numel(t) == _numel(shape) and t != shape for t in tensors[k].values()):
            return  # a same-sized tensor of another shape beside it: which is the parameter's is not shown
        if shape not in model_shapes:
            return
    key = next(iter(chosen.values()))[0]
    for known, k in zip(shapes.values(), ids):
        if known is None or not tensors.get(k):
            continue
        if tensors[k].get(key) != known:
            return  # the key is missing where the shape is known, or has another shape there: not the
            # parameter's buffer but a factor (GaLore's Adafactor: exp_avg_sq_row only on matrices)
    picks = {i: chosen[k][1] for i, k in todo}
    if model_counts is not None:
        # more indices of a shape than the model has parameters of it: a factor (RACS' row sums
        # [6] beside a [6, 4] weight), not the parameter
        wanted = Counter(s for s in shapes.values() if s is not None) + Counter(picks.values())
        if any(n > model_counts[s] for s, n in wanted.items()):
            return
    shapes.update(picks)


def _entries(opt: OptimizerState, names: Sequence[Sequence[tuple[str | None, tuple[str, ...]]]],
             evidence: str) -> list[IndexName]:
    state = opt.state
    shapes = _shapes(opt)
    # LBFGS keeps one global state (under the first index) that spans every parameter, in order
    everyone = is_lbfgs(opt) and any(bool(v) for v in state.values())
    make = tuple.__new__  # IndexName(...) without its Python-level __new__ (300k entries: a third of the time)
    return [make(IndexName, (idx, g.position, name, cands, shapes[idx], everyone or bool(state.get(idx)), evidence))
            for g, gnames in zip(opt.groups, names) for idx, (name, cands) in zip(g.params, gnames)]


def _exact(opt: OptimizerState, evidence: str, names: Sequence[Sequence[str]]) -> OptimizerMapping:
    rows = [((n, (n,)) for n in g) for g in names]  # made as consumed: no list of pairs beside the entries
    return OptimizerMapping(opt.name, evidence, _entries(opt, rows, evidence))  # type: ignore[arg-type]


# Buffers torch / transformers register under these names; never parameters. Excluding them turns
# "bn.weight, bn.bias or bn.running_mean?" into a certain answer.
KNOWN_BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked", "position_ids", "masked_bias",
                           "inv_freq"})


def qualifier(model: ModelState) -> str:
    """The prefix naming a model's parameters when one optimizer spans several models:
    its key without a ``_state_dict`` suffix (``network_fine_state_dict`` → ``network_fine``)."""
    key = model.name.rsplit(":", 1)[-1]
    for suffix in ("_state_dict", "state_dict"):
        if key.endswith(suffix) and key != suffix:
            key = key[: -len(suffix)]
    return key.rstrip("._") or model.name


def slots_of(models: Sequence[ModelState]) -> list[Slot]:
    """The model entries a parameter can be: floating tensors that are not known buffers, each tied
    group once (first name). Several models (one optimizer over all of them, NeRF-style) are
    concatenated in the given order and their names qualified: ``network_fine.pts_linears.0.weight``."""
    out = []
    make = tuple.__new__
    for m in models:
        prefix = qualifier(m) + "." if len(models) > 1 else ""
        tied = m.tied
        for name, meta in m.meta.items():
            if meta.dtype not in _FLOATING or name in tied or name[name.rfind(".") + 1:] in KNOWN_BUFFERS:
                continue
            out.append(make(Slot, (prefix + name, meta.shape)))  # (Slot(...) without its Python-level __new__)
    return out


def _align(opt: OptimizerState, models: Sequence[ModelState]) -> OptimizerMapping | None:
    groups = _items(opt)
    slots = slots_of(models)
    result = align_groups(slots, groups)
    if any(not a.candidates for g in result for a in g):
        return None  # this model cannot hold this optimizer's parameters in this order
    names = [[(a.name, a.candidates) for a in g] for g in result]
    return OptimizerMapping(opt.name, "model-order", _entries(opt, names, "model-order"),
                            model="+".join(m.name for m in models), basis=(slots, groups))


Names = list[list[tuple[str | None, tuple[str, ...]]]]


def _unordered(groups: Sequence[Sequence[Item]], slots: Sequence[Slot], taken: set[str]) -> Names | None:
    """Candidates by shape alone, ignoring order: an item is named when exactly one free slot fits.
    Repeats until no name is forced (each certain name frees no one else's slot). None: infeasible."""
    taken = set(taken)
    cands: list[list[list[str]]] = [
        [[s.name for s in slots if (it.shape is None or s.shape == it.shape) and s.name not in taken] for it in g]
        for g in groups
    ]
    if any(not c for g in cands for c in g):
        return None
    changed = True
    while changed:
        changed = False
        for g in cands:
            for c in g:
                if len(c) == 1 and c[0] not in taken:
                    taken.add(c[0])
                    changed = True
        for g in cands:
            for i, c in enumerate(g):
                if len(c) > 1:
                    rest = [n for n in c if n not in taken]
                    if len(rest) != len(c):
                        g[i] = rest or c
                        changed = changed or bool(rest)
    return [[(c[0] if len(c) == 1 else None, tuple(c)) for c in g] for g in cands]


def _align_partial(opt: OptimizerState, models: Sequence[ModelState]) -> OptimizerMapping | None:
    """Some groups are not ordered subsequences of the model (layers listed out of order by hand):
    align the groups that are, match the others by shape alone."""
    groups = _items(opt)
    slots = slots_of(models)
    ordered = [i for i, g in enumerate(groups) if all(a.candidates for a in align_groups(slots, [g])[0])]
    if not ordered:
        return None
    aligned = align_groups(slots, [groups[i] for i in ordered])
    names: list[list[tuple[str | None, tuple[str, ...]]]] = [[] for _ in groups]
    for i, res in zip(ordered, aligned):
        names[i] = [(a.name, a.candidates) for a in res]
    certain = {a.name for res in aligned for a in res if a.name is not None}
    others = [i for i in range(len(groups)) if i not in ordered]
    loose = _unordered([groups[i] for i in others], slots, certain)
    if loose is None:
        return None
    for i, row in zip(others, loose):
        names[i] = row
    m = OptimizerMapping(opt.name, "model-order", _entries(opt, names, "model-order"),
                         model="+".join(x.name for x in models))
    m.notes.append(f"param groups {others} are not in the model's order: matched by shape alone")
    return m


def _shapes_only(opt: OptimizerState, model: ModelState) -> OptimizerMapping:
    """No trustworthy order: an index is named only when its shape pins one parameter."""
    names = _unordered(_items(opt), slots_of([model]), set())
    if names is None:
        names = [[(None, ())] * len(g.params) for g in opt.groups]
    m = OptimizerMapping(opt.name, "shapes-only", _entries(opt, names, "shapes-only"), model=model.name)
    m.notes.append(
        f"{model.name} does not keep the registration order (safetensors / sharded weights are sorted by name); "
        "names are certain only for shape-unique parameters: pass --source module:callable (the old code) "
        "or a names file for exact names"
    )
    return m


def infer_mapping(
    ck: Checkpoint,
    opt: OptimizerState | None = None,
    *,
    source: SourceNames | None = None,
    source_names: Sequence[Sequence[str]] | None = None,
    models: Sequence[str] | None = None,
) -> OptimizerMapping:
    """Map every index of ``opt`` (default: the checkpoint's only optimizer) to a parameter name.

    ``source`` (or ``source_names``: names per group, in optimizer order) comes from the old code and
    passes the consistency gate first (:func:`_gate`); ``models`` picks (and concatenates, in order)
    model state dicts by name when the guess should not be made."""
    opt = opt or ck.optimizer()
    if source is None and source_names is not None:
        source = SourceNames("source_names", [list(g) for g in source_names])
    counts = Counter(tuple(meta.shape) for m in ck.models for meta in m.meta.values() if meta.is_floating)
    opt.__dict__["_model_shape_counts"] = counts
    opt.__dict__["_model_shapes"] = frozenset(counts) or None
    warnings = validate_optimizer(opt)
    with gc_paused():  # ~100k small objects per 100k parameters: collections would dominate the time
        mapping = _infer(ck, opt, models)
        mapping = _gate_saved_names(ck, opt, mapping, models)
        if source is not None:
            mapping = _gate(ck, opt, mapping, source)
    mapping.notes[:0] = warnings
    mapping.group_sizes = [len(g.params) for g in opt.groups]
    mapping.group_hparams = [dict(g.hparams) for g in opt.groups]
    mapping.overridden = opt.overridden
    if opt.overridden:
        mapping.notes.append(f"its state_dict() is not torch's layout ({opt.overridden}): remap refuses it")
    return mapping


def _shape_str(shape: tuple[int, ...] | None) -> str:
    return "?" if shape is None else str(list(shape))


def _saved_shapes(ck: Checkpoint) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for m in ck.models:
        for name, meta in m.meta.items():
            out.setdefault(name, tuple(meta.shape))
    return out


def _contradiction(idx: Any, name: str, state_shape: tuple[int, ...] | None,
                   shape: tuple[int, ...] | None, what: str) -> str | None:
    if state_shape is not None and shape is not None and tuple(shape) != tuple(state_shape):
        return f"index {idx} has state of shape {_shape_str(state_shape)}; {what} names it {name} {_shape_str(shape)}"
    return None


def _gate_saved_names(ck: Checkpoint, opt: OptimizerState, mapping: OptimizerMapping,
                      models: Sequence[str] | None) -> OptimizerMapping:
    """Saved ``param_names`` are evidence like any other: a name whose parameter (in the model saved
    beside it) has another shape than the index's state is refused, and with it the whole list."""
    if mapping.evidence != "param_names":
        return mapping
    known = _saved_shapes(ck)
    for e in mapping.entries:
        why = _contradiction(e.index, e.name or "", e.shape, known.get(e.name or ""), "param_names")
        if why is not None:
            fallback = _infer(ck, opt, models, use_param_names=False)
            fallback.rejected.append(Rejection("param_names", e.index, why))
            fallback.notes.append(f"saved param_names rejected: {why}")
            return fallback
    return mapping


def _source_rows(opt: OptimizerState, source: SourceNames, known: Mapping[str, tuple[int, ...]]
                 ) -> tuple[Names | None, str | None]:
    """Per saved group, per index: the name the source claims (or its candidates, for a module order).
    ``(None, why)`` when the claim cannot even be laid over the saved groups."""
    sizes = [len(g.params) for g in opt.groups]
    got = [len(g) for g in source.groups]
    if source.ordered:
        if got == sizes:
            exact: Names = [[(n, (n,)) for n in g] for g in source.groups]
            return exact, None
        if len(source.groups) == 1 and sum(got) == sum(sizes):  # one flat list in optimizer order
            flat, start = source.groups[0], 0
            rows: Names = []
            for n in sizes:
                rows.append([(x, (x,)) for x in flat[start:start + n]])
                start += n
            return rows, None
        return None, f"its param groups have sizes {got}, the checkpoint's {sizes}"
    order = [n for g in source.groups for n in g]
    missing = [n for n in order if n not in known]
    if missing:
        return None, f"no shape known for {missing[0]}"
    slots = [Slot(n, tuple(known[n])) for n in order]
    result = align_groups(slots, _items(opt))
    if any(not a.candidates for g in result for a in g):
        return None, ("the saved param groups are not ordered subsequences of its parameters "
                      "with the shapes their state shows")
    return [[(a.name, a.candidates) for a in g] for g in result], None


def _prefixed(a: set[str], b: set[str]) -> bool:
    """The two name sets meet once a wrapper prefix (``module.``, Lightning's ``model.``) is removed
    from one side."""
    def strip(names: set[str]) -> set[str]:
        return {n.split(".", 1)[1] for n in names if "." in n}

    return any(len(x & y) * 2 > min(len(x), len(y)) for x, y in ((strip(a), b), (a, strip(b))) if x and y)


def _gate(ck: Checkpoint, opt: OptimizerState, base: OptimizerMapping, source: SourceNames) -> OptimizerMapping:
    """The consistency gate for names offered by the caller. They are used only if nothing in the
    checkpoint contradicts them: every saved group keeps its size (or, for a model order, each saved
    group is an ordered subsequence of it), the state's shapes agree with each named parameter's
    shape (the source's own, else the model saved in the checkpoint), no name is given twice, and each
    name is one the checkpoint's own evidence allows for that index (its exact name, or among its
    candidates). One contradiction shows the claim wrong as a whole, so it is then not used at all
    (what the checkpoint alone says stays), and the mapping records why (``rejected``)."""
    saved = _saved_shapes(ck)
    known = {**source.fallback_shapes, **saved, **source.shapes}

    def rejected(index: Any, why: str) -> OptimizerMapping:
        out = replace(base, notes=list(base.notes), rejected=[*base.rejected, Rejection("source", index, why)])
        out.notes.append(f"--source {source.spec} rejected (it contradicts the checkpoint): {why}")
        return out

    for n, shape in source.shapes.items():  # the old code must have the old model's shapes
        if n in saved and tuple(saved[n]) != tuple(shape):
            return rejected(None, f"{n} is {_shape_str(tuple(shape))} in the source but "
                                  f"{_shape_str(tuple(saved[n]))} in the checkpoint's model")
    rows, why = _source_rows(opt, source, known)
    if rows is None and source.ordered:  # names for another optimizer altogether: bad input, not evidence
        from .errors import MappingError

        raise MappingError(f"{opt.name}: --source {source.spec}: {why}")
    if rows is None:
        return rejected(None, why or "")
    universe = {c for e in base.entries for c in e.candidates}
    offered = {c for g in rows for _, cands in g for c in cands}
    comparable = bool(universe) and len(offered & universe) * 2 > len(offered)
    if universe and not comparable and not _prefixed(offered, universe):
        return rejected(None, f"it names none of the checkpoint's parameters (e.g. {sorted(offered)[0]})")
    seen: dict[str, Any] = {}
    names: Names = []
    shapes = _shapes(opt)
    by_index = {e.index: e for e in base.entries}
    for g, row in zip(opt.groups, rows):
        out_row = []
        for idx, (name, cands) in zip(g.params, row):
            ours = by_index[idx]
            state_shape = shapes[idx]
            keep = tuple(c for c in cands if c not in known or state_shape is None
                         or tuple(known[c]) == tuple(state_shape))
            if comparable and ours.candidates:
                keep = tuple(c for c in keep if c in ours.candidates)
            if not keep:
                first = name or (cands[0] if cands else "?")
                why = _contradiction(idx, first, shapes[idx], known.get(first), "source") or (
                    f"index {idx} can only be {' | '.join(ours.candidates[:3])} by the checkpoint's "
                    f"{ours.evidence} evidence; source names it {first}")
                return rejected(idx, why)
            certain = keep[0] if len(keep) == 1 else None
            if certain is not None:
                if certain in seen:
                    return rejected(idx, f"source names both index {seen[certain]} and index {idx} {certain}")
                seen[certain] = idx
            out_row.append((certain, keep))
        names.append(out_row)
    entries = _entries(opt, names, "source")
    # a name the source left open but the checkpoint pins keeps the checkpoint's evidence
    entries = [e if e.name is not None or by_index[e.index].name is None else
               by_index[e.index] for e in entries]
    how = "names in optimizer order" if source.ordered else "its parameter order, aligned per saved group"
    notes = [n for n in base.notes if not n.startswith(("no model state dict", "no model state was saved"))]
    if base.evidence == "shapes-only":
        notes = [n for n in notes if "does not keep the registration order" not in n]
    notes.append(f"--source {source.spec}: {how}, checked against the saved state's shapes")
    return OptimizerMapping(opt.name, "source", entries, model=base.model, notes=notes, basis=base.basis,
                            rejected=list(base.rejected))


def _infer(ck: Checkpoint, opt: OptimizerState, models: Sequence[str] | None, *,
           use_param_names: bool = True) -> OptimizerMapping:
    groups = opt.groups
    sizes = [len(g.params) for g in groups]
    if use_param_names and groups and all(g.param_names is not None and len(g.param_names) == len(g.params)
                                          for g in groups):
        return _exact(opt, "param_names", [list(g.param_names or ()) for g in groups])
    if groups and all(isinstance(i, str) for g in groups for i in g.params):
        # DCP / get_state_dict: keyed by name and loaded by name. DeepSpeed ZeRO: named exactly by
        # its saved param_shapes, but DeepSpeed loads its flat partitions by position
        evidence = "deepspeed" if ck.layout == "deepspeed" else "fqn"
        return _exact(opt, evidence, [[str(i) for i in g.params] for g in groups])

    chosen = _choose_models(ck, models)
    trusted = [m for m in chosen if m.order_trusted]
    if trusted and (models is None or len(trusted) == len(chosen)):
        if models is not None:
            found = _align(opt, chosen)
            if found is not None:
                return found
        else:
            for m in trusted:  # the main model first, then the others alone, then all together
                found = _align(opt, [m])
                if found is not None:
                    return found
            if len(trusted) > 1:
                found = _align(opt, trusted)
                if found is not None:
                    found.notes.append(f"one optimizer over several models, concatenated: {found.model}")
                    return found
            found = _align_partial(opt, [trusted[0]])
            if found is not None:
                return found
    if _group_names_usable(opt):
        return _exact(opt, "group-name", [[str(g.hparams["name"])] for g in groups])
    untrusted = [m for m in chosen if not m.order_trusted]
    if untrusted and not trusted:
        by_shape = _shapes_only(opt, untrusted[0])
        by_shape.notes.extend(ck.notes)
        return by_shape
    none = OptimizerMapping(opt.name, "none", _entries(opt, [[(None, ())] * n for n in sizes], "none"))
    if trusted:
        none.notes.append("no model state dict in this checkpoint can hold this optimizer's parameters in order "
                          "(the groups are not ordered subsequences of its parameters): pass --source")
    else:
        none.notes.append("no model state dict found: pass --model PATH or --source module:callable")
    return none


def name_by_target_shapes(mapping: OptimizerMapping, names: Sequence[str],
                          shapes: Mapping[str, tuple[int, ...]]) -> OptimizerMapping:
    """The weakest evidence, for an optimizer saved without any model (call it only then; it acts only on
    ``evidence == "none"``): the new code's parameter shapes. An index is named only when its state's
    shape occurs once among the optimizer's indices and once among the target's parameters (evidence
    ``target-shapes``, "named by shape only"); the others keep the target parameters of their shape as
    candidates. Any other mapping is returned unchanged."""
    if mapping.evidence != "none" or not shapes:
        return mapping
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for n in names:
        if n in shapes:
            by_shape.setdefault(tuple(shapes[n]), []).append(n)
    in_optimizer: dict[tuple[int, ...] | None, int] = {}
    for e in mapping.entries:
        in_optimizer[e.shape] = in_optimizer.get(e.shape, 0) + 1
    entries = []
    for e in mapping.entries:
        fits = tuple(by_shape.get(e.shape, ())) if e.shape is not None else ()
        unique = len(fits) == 1 and in_optimizer[e.shape] == 1
        entries.append(e._replace(name=fits[0] if unique else None, candidates=fits,
                                  evidence="target-shapes" if fits else e.evidence))
    named = sum(e.name is not None for e in entries)
    if not named:
        return mapping
    notes = [n for n in mapping.notes if not n.startswith("no model state dict found")]
    notes.append(f"no model state was saved with this optimizer: {named} of {len(entries)} indices named by shape "
                 "only (their shape occurs once in the optimizer and once in the target), the weakest evidence; "
                 "pass --model PATH (the model saved with it) or --source (the old code) for certain names")
    return dataclasses.replace(mapping, evidence="target-shapes", entries=entries, notes=notes)


def _choose_models(ck: Checkpoint, models: Sequence[str] | None) -> list[ModelState]:
    if models is None:
        return list(ck.models)
    from .errors import MappingError

    by_name = {m.name: m for m in ck.models}
    missing = [n for n in models if n not in by_name]
    if missing:
        raise MappingError(f"no model state dict named {missing[0]!r} (found: {', '.join(by_name) or 'none'})")
    return [by_name[n] for n in models]


def _group_names_usable(opt: OptimizerState) -> bool:
    groups = opt.groups
    names = [g.hparams.get("name") for g in groups]
    return (
        bool(groups)
        and all(len(g.params) == 1 for g in groups)
        and all(isinstance(n, str) and n for n in names)
        and len(set(names)) == len(names)
    )


# keys a scheduler rewrites (so a fresh target optimizer differs from the saved one), per-group counters
# an optimizer advances (Prodigy's ``k``, a group ``step``) and the keys that are not hyperparameters:
# left out when telling groups apart by their hyperparameters
_SCHEDULED = frozenset({"params", "param_names", "lr", "initial_lr", "momentum", "betas", "max_lr", "min_lr",
                        "base_momentum", "max_momentum", "step", "k"})
_NOT_HPARAMS = frozenset({"params", "param_names", "step", "k"})


def _signature(hp: Mapping[str, Any], leave_out: frozenset[str] = _SCHEDULED) -> str:
    return repr(sorted((k, repr(v)) for k, v in hp.items() if k not in leave_out))


def _by_unique_key(saved: Sequence[str], target: Sequence[str], todo_s: Sequence[int],
                   todo_t: Sequence[int]) -> dict[int, int]:
    """Pairs of the remaining groups whose key occurs once on each side."""
    ks, kt = Counter(saved[g] for g in todo_s), Counter(target[t] for t in todo_t)
    where = {target[t]: t for t in todo_t if kt[target[t]] == 1}
    return {g: where[saved[g]] for g in todo_s if ks[saved[g]] == 1 and saved[g] in where}


def pair_groups(saved: Sequence[Mapping[str, Any]], target: Sequence[Mapping[str, Any]], *,
                members: Sequence[set[int]] | None = None, harmless_position: bool = False,
                sizes: tuple[Sequence[int], Sequence[int]] | None = None) -> tuple[list[int], str] | None:
    """The target group each saved group corresponds to, one-to-one, and by what; never by position
    alone where position could be wrong.

    In order: equal ``name`` keys; membership (``members[g]``: the target groups that saved group
    ``g``'s certainly named parameters are in; a saved group split over several target groups means
    the grouping changed: no pairing); equal hyperparameters, all of them (a per-group counter left
    out) or all but the scheduled ones (lr, momentum...), each unique on both sides; the last group
    left on each side. ``harmless_position`` pairs what remains by position only where that cannot
    matter: the remaining saved groups have identical hyperparameters, or are empty on both sides
    (``sizes``: the saved and the target groups' sizes).
    None when the groups cannot be paired with certainty."""
    if len(saved) != len(target) or not saved:
        return None
    names_s = [g.get("name") for g in saved]
    names_t = [g.get("name") for g in target]
    if all(isinstance(n, str) for n in names_s + names_t) and len(set(names_s)) == len(saved) \
            and set(names_s) == set(names_t):
        where = {n: i for i, n in enumerate(names_t)}
        return [where[n] for n in names_s], "name"
    pairs: dict[int, int] = {}
    how: list[str] = []
    if members is not None:
        if any(len(m) > 1 for m in members):
            return None
        for g, m in enumerate(members):
            if m:
                pairs[g] = next(iter(m))
        if len(set(pairs.values())) != len(pairs):
            return None
        how += ["membership"] if pairs else []
    # with as many parameters on both sides, a pair of groups of different sizes is no pair
    same_total = sizes is not None and sum(sizes[0]) == sum(sizes[1])
    for leave_out, label in ((_NOT_HPARAMS, "hyperparameters"), (_SCHEDULED, "unscheduled hyperparameters")):
        taken = set(pairs.values())
        todo_s = [g for g in range(len(saved)) if g not in pairs]
        todo_t = [t for t in range(len(target)) if t not in taken]
        found = _by_unique_key([_signature(h, leave_out) for h in saved], [_signature(h, leave_out) for h in target],
                               todo_s, todo_t)
        if same_total and sizes is not None and any(sizes[0][g] != sizes[1][t] for g, t in found.items()):
            return None
        pairs.update(found)
        how += [label] if found else []
    taken = set(pairs.values())
    todo_s = [g for g in range(len(saved)) if g not in pairs]
    todo_t = [t for t in range(len(target)) if t not in taken]
    if len(todo_s) == 1:
        pairs[todo_s[0]] = todo_t[0]
        how.append("elimination")
    elif todo_s and harmless_position:
        alike = len({_signature(saved[g], _NOT_HPARAMS) for g in todo_s}) == 1
        empty = sizes is not None and all(not sizes[0][g] and not sizes[1][t] for g, t in zip(todo_s, todo_t))
        if alike or empty:
            pairs.update(zip(todo_s, todo_t))
            how.append("position (the remaining groups " + ("are alike)" if alike else "are empty)"))
    if len(pairs) != len(saved):
        return None
    return [pairs[g] for g in range(len(saved))], " + ".join(how)


def _same_shapes(items: Sequence[Item], names: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """As many parameters, and the shapes the saved state shows all among the new ones."""
    known = Counter(it.shape for it in items if it.shape is not None)
    have = Counter(shapes.get(n) for n in names)
    return len(items) == len(names) and all(have[s] >= c for s, c in known.items())


def _in_model_order(groups: Sequence[Sequence[str]], order: Sequence[str] | None) -> bool:
    flat = [n for g in groups for n in g]
    if order is None or not flat:
        return False
    pos = {n: i for i, n in enumerate(order)}
    at = [pos.get(n, -1) for n in flat]
    return min(at) >= 0 and all(a < b for a, b in zip(at, at[1:]))


def settle_by_grouping(mapping: OptimizerMapping, target_groups: Sequence[Sequence[str]],
                       target_shapes: Mapping[str, tuple[int, ...]], target_hparams: Sequence[Mapping[str, Any]],
                       to_target: Callable[[str], str], target_order: Sequence[str] | None = None) -> OptimizerMapping:
    """The ``group-structure`` rung: when the new code's param groups correspond one-to-one to the
    saved ones (:func:`pair_groups`) and each pair holds the same parameters' shapes, assume the
    grouping rule is unchanged: an old group's indices can only be parameters of its new counterpart.
    Only what the stronger evidence left ambiguous is settled; anything inconsistent leaves the
    mapping as it was (with a note). ``to_target`` turns a checkpoint name into the target's;
    ``target_order`` is the new model's parameter order (for ``group-order``)."""
    if not mapping.ambiguous or mapping.basis is None:
        return mapping
    slots, items = mapping.basis
    sizes = [len(g) for g in items]

    def unused(why: str) -> OptimizerMapping:
        return replace(mapping, notes=[*mapping.notes, f"group-structure: not used: {why}"])

    single = sum(1 for n in sizes if n) >= 2 and all(n <= 1 for n in sizes)
    group_of = {n: t for t, names in enumerate(target_groups) for n in names}
    evidence = "group-structure"
    members: list[set[int]] = [set() for _ in sizes]
    for e in mapping.entries:
        if e.name is not None and to_target(e.name) in group_of:
            members[e.group].add(group_of[to_target(e.name)])
    paired = None if single else pair_groups(mapping.group_hparams, target_hparams, members=members,
                                             sizes=(sizes, [len(g) for g in target_groups]))
    if paired is not None:
        pairs, how = paired
        for g, t in enumerate(pairs):
            if not _same_shapes(items[g], target_groups[t], target_shapes):
                return unused(f"saved group {g} and new group {t} (matched by {how}) hold different parameters")
        result = align_groups(slots, items, slot_class=[group_of.get(to_target(s.name), -1) for s in slots],
                              group_class=pairs)
    elif single and _in_model_order(target_groups, target_order) and \
            _same_shapes([it for g in items for it in g], list(group_of), target_shapes):
        # one parameter per group, made by walking the model (the new code's groups do): the old groups
        # in order are one ordered subsequence of the old model, over the parameters the new one holds
        evidence, how = "group-order", "one-parameter groups in model order, as the new code makes them"
        flat = align_groups(slots, [[it for g in items for it in g]],
                            slot_class=[0 if to_target(s.name) in group_of else -1 for s in slots], group_class=[0])
        result = [flat[0]]
    else:
        return unused("the new optimizer's param groups do not correspond one-to-one to the saved ones")
    allowed = {a.index: set(a.candidates) for g in result for a in g}
    entries = []
    settled = 0
    for e in mapping.entries:
        cands = tuple(c for c in e.candidates if c in allowed.get(e.index, ()))
        if not cands:
            return unused("the new grouping cannot hold the saved groups in the saved model's order")
        if e.name is None and len(cands) < len(e.candidates):
            settled += len(cands) == 1
            e = e._replace(name=cands[0] if len(cands) == 1 else None, candidates=cands, evidence=evidence)
        entries.append(e)
    note = (f"{evidence}: {settled} indices named assuming the new code groups parameters as the old code "
            f"did ({how}); --no-group-evidence turns this off")
    return replace(mapping, entries=entries, notes=[*mapping.notes, note])
