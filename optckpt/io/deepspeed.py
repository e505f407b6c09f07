"""DeepSpeed ZeRO checkpoints (stages 1-3), read offline without DeepSpeed.

``engine.save_checkpoint(dir)`` writes ``dir/latest`` (the tag) and ``dir/<tag>/`` holding
``mp_rank_00_model_states.pt`` (stage 3: ``zero_pp_rank_R_mp_rank_00_model_states.pt``, one per
rank) and one ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank. The
optimizer files pickle DeepSpeed's own objects (the loss scaler, the stage enum), so they are read
by the safe reader (inert placeholders, nothing imported); only plain tensors, numbers and lists are
used from them.

Each rank holds flat fp32 partitions and flat optimizer state over them. They are cut back into
per-parameter tensors with the saved ``param_shapes`` (names and flat order per group):

* stages 1/2: ``single_partition_of_fp32_groups[g]`` (padding already removed) concatenated across
  ranks is group ``g``'s flat buffer, each parameter followed by its ``param_alignment_paddings``;
  the optimizer state of group ``g`` is padded by ``group_paddings[g]`` on each rank;
* stage 3: ``fp32_flat_groups`` (sub-groups, concatenated) holds every parameter's
  ``ceil(numel / world_size)``-element slice; a parameter is its slices in rank order, trimmed.

The result is keyed by name, like DCP's (``{"state": {fqn: {...}}, "param_groups": [{...,
"params": [fqn, ...]}]}``). A piece held by one tensor of the files is a view of it: of the memory-mapped
file, or, read lazily (commands that need no values), a record reference (no torch); only a piece
split between ranks is joined."""

from __future__ import annotations

import math
import os
import re
import sys
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from itertools import accumulate, compress
from operator import add
from typing import Any, NamedTuple

from ..checkpoint import Checkpoint, ModelState, OptimizerState, Part, SchedulerState, TensorMeta
from ..errors import LoadError
from ..tensors import RecordTensor, Size, is_tensor, materialize
from .paths import member_path
from .safepickle import first_placeholder
from .torchfile import load_torch_file, sniff

__all__ = ["deepspeed_dir", "deepspeed_stage0_dir", "load_deepspeed"]

_MODEL = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MAX_PARAMS = 1_000_000
_MAX_DIM = 1 << 62  # torch's sizes are int64; no real dimension comes near


def _zero_files(path: str) -> tuple[list[str], list[str]]:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return [], []
    files = [n for n in names if os.path.isfile(os.path.join(path, n))]
    return [n for n in files if _MODEL.match(n)], [n for n in files if _OPTIM.match(n)]


def deepspeed_dir(path: str) -> str | None:
    """The ZeRO step directory ``path`` stands for (itself, or the tag its ``latest`` file names),
    or None when it is not one. Stage 0 (no optimizer partitions) is an ordinary directory."""
    models, optims = _zero_files(path)
    if models and optims:
        return path
    step = _follow_latest(path)
    if step is None:
        return None
    models, optims = _zero_files(step)
    return step if models and optims else None


def deepspeed_stage0_dir(path: str) -> str | None:
    """The stage-0 step directory ``path``'s ``latest`` file names (its model states file holds the plain
    torch optimizer state dict, there are no optimizer partitions), or None. Read as an ordinary
    directory, its files as parts under ``<tag>/``."""
    step = _follow_latest(path)
    if step is None:
        return None
    models, optims = _zero_files(step)
    return step if models and not optims else None


def _follow_latest(path: str) -> str | None:
    """The step directory named by ``path/latest`` (kept inside ``path``), or None."""
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest) or os.path.getsize(latest) > 4096:
        return None
    try:
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not tag:
        return None
    step = member_path(path, tag, latest)
    real_root, real = os.path.realpath(path), os.path.realpath(step)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise LoadError(f"{latest}: names the step directory {tag!r}, which leads outside the checkpoint "
                        "directory (a symlink?); refused")
    return step if os.path.isdir(step) else None


def load_deepspeed(path: str, step: str, trust_pickle: bool = False, lazy: bool = False) -> Checkpoint:
    """A ZeRO checkpoint (``path``: the directory given; ``step``: its tag directory) as a name-keyed
    :class:`Checkpoint`: the model from ``module``, the optimizer cut back per parameter. ``lazy``: the
    files read as record references where the lazy reader can (:func:`load_torch_file`); the pieces
    cut from them are then record references too, and torch is imported only for a piece that spans
    two records (a parameter split between ranks), which is joined."""
    models, optims = _zero_files(step)
    rel = os.path.relpath(step, path)
    ck = Checkpoint(path=path, layout="deepspeed")
    loaded: dict[str, Any] = {}
    for n in [*models, *optims]:
        full = os.path.join(step, n)
        got = load_torch_file(full, trust_pickle=trust_pickle, kind=sniff(full), lazy=lazy)
        relpath = n if rel == "." else os.path.join(rel, n)
        ck.parts.append(Part(relpath, "torch", os.path.getsize(full), got.obj, got.saved_locations, got.zip_format))
        loaded[n] = got.obj
    mp = {int(m.group(2)) for n in [*models, *optims] if (m := (_MODEL.match(n) or _OPTIM.match(n)))}
    if mp != {0}:
        raise LoadError(f"{step}: model-parallel ZeRO checkpoint (mp ranks {sorted(mp)}); only mp_rank 00 is read")
    ranks = sorted((int(_group(_OPTIM, n, 1)), n) for n in optims)
    if [r for r, _ in ranks] != list(range(len(ranks))):
        raise LoadError(f"{step}: optimizer partitions of ranks {[r for r, _ in ranks]}; expected 0..{len(ranks) - 1}")
    model_sd = _dict(loaded[models[0]], f"{step}/{models[0]}")
    zero = [_dict(_dict(loaded[n], f"{step}/{n}").get("optimizer_state_dict"), f"{step}/{n}: optimizer_state_dict")
            for _, n in ranks]
    shapes = _param_shapes(model_sd, f"{step}/{models[0]}")
    where = f"{step}/{ranks[0][1]}"
    if "fp32_flat_groups" in zero[0]:
        stage, params, state, groups = 3, *_cut_stage3(zero, shapes, where)
    elif "single_partition_of_fp32_groups" in zero[0]:
        stage, params, state, groups = 1, *_cut_stage12(zero, shapes, where, masters=False)
    else:
        raise LoadError(f"{where}: neither single_partition_of_fp32_groups nor fp32_flat_groups: "
                        "not a ZeRO stage 1-3 optimizer file")
    opt_sd = {"state": state, "param_groups": groups}
    # every value in the state is a tensor cut here or a scalar shared by the group (checked through its
    # first parameter); the names are param_shapes' strings: a walk of them all would be per-entry work
    firsts = [group.names[0] for group in shapes if group.names]
    hit = first_placeholder({"state": {k: state[k] for k in firsts if k in state},
                             "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups]})
    if hit is not None:
        raise LoadError(f"{where}: optimizer field {hit[0]} is a pickled object where plain data belongs")
    module = model_sd.get("module")
    tensors = {k: v for k, v in module.items() if is_tensor(v)} if isinstance(module, Mapping) else {}
    if stage == 3:  # the module holds empty placeholders for partitioned parameters: the fp32 masters stand in
        tensors = {k: params.get(k, v) for k, v in tensors.items()}
        tensors.update({k: v for k, v in params.items() if k not in tensors})
        empty = [k for k, v in tensors.items() if v.numel() == 0]
        if empty:
            ck.notes.append(f"stage 3: {len(empty)} partitioned tensor(s) not among the optimizer's parameters "
                            f"(frozen?) are empty here: {', '.join(empty[:3])}")
    ck.models.append(ModelState("module", os.path.join(rel, models[0]) if rel != "." else models[0], ("module",),
                                tensors, {k: TensorMeta.of(v) for k, v in tensors.items()}, order_trusted=True))
    ck.optimizers.append(OptimizerState("optimizer", ck.parts[len(models)].relpath, ("optimizer_state_dict",), opt_sd))
    sched = model_sd.get("lr_scheduler")
    if isinstance(sched, dict) and "last_epoch" in sched and first_placeholder(sched) is None:
        ck.schedulers.append(SchedulerState("lr_scheduler", ck.models[0].part, ("lr_scheduler",), sched))
    ck.extras["zero_stage"] = _config_stage(loaded[ranks[0][1]]) or stage
    ck.extras["world_size"] = len(ranks)
    for k in ("global_steps", "global_samples", "skipped_steps", "ds_version"):
        v = model_sd.get(k)
        if isinstance(v, (int, float, str, bool)):
            ck.extras[k] = v
    return ck


def _group(rx: re.Pattern[str], name: str, i: int) -> str:
    m = rx.match(name)
    assert m is not None
    return m.group(i)


def _dict(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise LoadError(f"{what}: expected a dict, found {type(obj).__name__}")
    return obj


def _config_stage(obj: Any) -> int | None:
    cfg = obj.get("ds_config") if isinstance(obj, dict) else None
    z = cfg.get("zero_optimization") if isinstance(cfg, dict) else None
    s = z.get("stage") if isinstance(z, dict) else None
    return s if isinstance(s, int) else None


class _Group(NamedTuple):
    """One group of ``param_shapes``: its names in flat order, their shapes (one tuple object per
    distinct shape, shared: a file repeating a shape costs a list slot per parameter, not a tuple)
    and element counts, and its distinct zero-size shapes (parameters that hold no element)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    numels: list[int]
    zero_shapes: list[tuple[int, ...]]


def _new_group(names: list[str], shapes: list[tuple[int, ...]]) -> _Group:
    """A group of checked shapes; the element counts computed once per distinct shape."""
    numel = {shape: math.prod(shape) for shape in dict.fromkeys(shapes)}
    return _Group(names, shapes, list(map(numel.__getitem__, shapes)), [s for s, n in numel.items() if n == 0])


def _param_shapes(model_sd: Mapping[str, Any], what: str) -> list[_Group]:
    raw = model_sd.get("param_shapes")
    if not isinstance(raw, list) or not raw:
        raise LoadError(f"{what}: no param_shapes: cannot cut the flat ZeRO partitions by parameter")
    out: list[_Group] = []
    total = 0
    unique_keys = True
    for g in raw:
        if not isinstance(g, Mapping):
            raise LoadError(f"{what}: param_shapes entry is {type(g).__name__}, not a name -> shape mapping")
        total += len(g)
        if total > _MAX_PARAMS:
            raise LoadError(f"{what}: param_shapes lists more than {_MAX_PARAMS:,} parameters; refused")
        unique_keys = unique_keys and isinstance(g, dict)
        if isinstance(g, dict) and type(g) in (dict, OrderedDict) \
                and set(map(type, dict.values(g))) <= _size_types() and set(map(type, dict.keys(g))) <= {str}:
            out.append(_sizes(g, what))  # the usual file: one check per distinct shape
            continue
        names: list[str] = []
        shapes: list[tuple[int, ...]] = []
        for name, shape in (dict.items(g) if isinstance(g, dict) else list(g.items())):
            names.append(name)
            shapes.append(_dims(name, shape, what))
        out.append(_new_group(names, shapes))
    if _twice(out, unique_keys):
        raise LoadError(f"{what}: param_shapes names a parameter twice")
    return out


def _sizes(g: dict[Any, Any], what: str) -> _Group:
    """A group of ``param_shapes`` whose names are strings and whose shapes are ``torch.Size`` (what
    DeepSpeed writes): each distinct shape checked once; every walk over the parameters is C-level.
    The loaded dict is made to hold one object per distinct shape (equal values; a file repeating a
    shape 300k times held 300k objects: 22 MB, for 0.09 s). An ``OrderedDict`` is read through
    ``dict``'s own views (in its order: a pickle builds it by insertion and can call nothing that
    reorders it), ten times faster than its linked list."""
    names = list(dict.keys(g))
    values = list(dict.values(g))
    dims: dict[Any, tuple[int, ...]] = {}
    for shape in dict.fromkeys(values):  # (the first object of each value: torch.Size holds ints only)
        try:
            dims[shape] = _dims("", shape, what)
        except LoadError:
            name = names[values.index(shape)]
            _dims(name, shape, what)
            raise
    first = {shape: shape for shape in dims}
    dict.update(g, zip(names, map(first.__getitem__, values)))  # (values replaced: no key added, none moved)
    numel = {shape: math.prod(d) for shape, d in dims.items()}
    return _Group(names, list(map(dims.__getitem__, values)), list(map(numel.__getitem__, values)),
                  list(dict.fromkeys(d for shape, d in dims.items() if numel[shape] == 0)))


def _dims(name: Any, shape: Any, what: str) -> tuple[int, ...]:
    """``shape`` as a tuple of dimensions, or a one-line error naming the entry."""
    dims = tuple(shape) if type(shape) in (tuple, list) or type(shape) in _size_types() else None
    if type(name) is not str or dims is None or len(dims) > 64 \
            or not all(type(d) is int and 0 <= d < _MAX_DIM for d in dims):
        raise LoadError(f"{what}: param_shapes entry {_short(name)}: {_short(shape)} is not a shape "
                        "(a list of non-negative integers below 2**62)")
    if dims and min(dims) and math.prod(dims) >= _MAX_DIM:
        raise LoadError(f"{what}: param_shapes entry {_short(name)}: {_short(list(dims))} has more "
                        "elements than any tensor can hold")
    return dims


def _twice(groups: Sequence[_Group], unique_keys: bool) -> bool:
    """Whether a name occurs twice. The keys of one dict are distinct already: then only the groups
    but the largest go into a set, and the largest is looked up in it (no set of every name)."""
    if not unique_keys:
        names = [n for g in groups for n in g.names]
        return len(set(names)) != len(names)
    big = max(range(len(groups)), key=lambda i: len(groups[i].names))
    others: set[str] = set()
    count = 0
    for i, g in enumerate(groups):
        if i != big:
            others.update(g.names)
            count += len(g.names)
    return len(others) != count or not others.isdisjoint(groups[big].names)


def _short(v: Any) -> str:
    """``repr(v)`` cut to one short line (for an error naming a hostile value)."""
    try:
        plain = type(v) in (str, int, float, bool, tuple, list) or type(v) in _size_types()
        text = repr(v) if plain else f"<{type(v).__name__}>"
    except Exception:
        text = f"<{type(v).__name__}>"
    text = text.replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _size_types() -> frozenset[type]:
    """The types a loaded ``torch.Size`` has: the lazy reader's :class:`~optckpt.tensors.Size`, and
    torch's own once torch is imported (the torch-backed readers make those)."""
    torch = sys.modules.get("torch")
    return frozenset({Size, torch.Size}) if torch is not None else frozenset({Size})


def _tensor(v: Any, what: str) -> Any:
    if not is_tensor(v) or v.dim() != 1:
        raise LoadError(f"{what}: expected a flat (1-d) tensor, found {type(v).__name__}")
    return v


def _ints(v: Any, n: int, what: str) -> list[int]:
    if not isinstance(v, list) or len(v) != n or not set(map(type, v)) <= {int} or (v and min(v) < 0):
        raise LoadError(f"{what}: expected a list of {n} non-negative integers")
    return v


def _hparams(base: Mapping[str, Any], n_groups: int, what: str) -> list[dict[str, Any]]:
    groups = base.get("param_groups")
    if not isinstance(groups, list) or len(groups) != n_groups or not all(isinstance(g, dict) for g in groups):
        raise LoadError(f"{what}: base optimizer has no param_groups matching param_shapes' {n_groups} group(s)")
    return groups


def _strides(shape: tuple[int, ...], step: int) -> tuple[int, ...]:
    """The strides torch gives ``flat.view(shape)`` of a 1-d tensor of stride ``step`` (an empty view:
    the contiguous ones)."""
    out: list[int] = []
    acc = step if 0 not in shape else 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


def _view(t: Any, start: int, shape: tuple[int, ...]) -> Any:
    """``t.narrow(0, start, numel).view(shape)`` of a 1-d tensor ``t``: for a record reference, the
    same view of its record (no torch)."""
    if type(t) is RecordTensor:
        step = t.stride()[0]
        return t.view_of(t.storage_offset() + start * step, shape, _strides(shape, step))
    return t.narrow(0, start, math.prod(shape)).view(shape)


class _Flat:
    """A flat buffer held as 1-d tensors end to end (a rank's sub-groups; a group's partitions on the
    ranks), never joined as a whole: a piece cut from it is a view of the one tensor that holds it (a
    record reference stays one), and only a piece that spans two of them is joined (by torch)."""

    __slots__ = ("parts", "starts", "total")

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self.starts: list[int] = []
        n = 0
        for p in self.parts:
            self.starts.append(n)
            n += p.numel()
        self.total = n

    @classmethod
    def join(cls, flats: Sequence[_Flat]) -> _Flat:
        return cls([p for f in flats for p in f.parts])

    def numel(self) -> int:
        return self.total

    def span(self, off: int, n: int) -> _Flat:
        """Elements ``[off, off + n)``, still in pieces."""
        if len(self.parts) == 1:
            return _Flat([_view(self.parts[0], off, (n,))])
        out = []
        for p, s in zip(self.parts, self.starts):
            lo, hi = max(off, s), min(off + n, s + p.numel())
            if lo < hi:
                out.append(_view(p, lo - s, (hi - lo,)))
        return _Flat(out or [_view(self.parts[0], 0, (0,))])

    def view(self, off: int, n: int, shape: tuple[int, ...]) -> Any:
        """Elements ``[off, off + n)`` (``n > 0``) as a tensor of ``shape``."""
        i = 0 if len(self.parts) == 1 else bisect_right(self.starts, off) - 1
        part, start = self.parts[i], self.starts[i]
        if off - start + n <= part.numel():
            return _view(part, off - start, shape)
        import torch

        return torch.cat([materialize(p) for p in self.span(off, n).parts]).view(shape)

    def empty(self, shape: tuple[int, ...]) -> Any:
        return _view(self.parts[0], 0, shape)


def _own(v: Any) -> Any:
    """A parameter's own copy of a group's scalar state (``step``): a tensor cloned, a record
    reference copied (it is never written to: an edit materialises it first)."""
    if type(v) is RecordTensor:
        return v.view_of(v.storage_offset(), v.shape, v.stride())
    return v.clone() if is_tensor(v) else v


class _Pieces(NamedTuple):
    """A flat buffer cut back per parameter: views for the parameters that hold elements (by position
    in the group), one empty view per zero-size shape (shared by every such parameter)."""

    views: dict[int, Any]
    empty: dict[tuple[int, ...], Any]

    def at(self, i: int, shape: tuple[int, ...]) -> Any:
        v = self.views.get(i)
        return self.empty[shape] if v is None else v

    def listed(self, group: _Group) -> list[Any]:
        return [self.at(i, shape) for i, shape in enumerate(group.shapes)]


class _Layout(NamedTuple):
    """Where a group's parameters lie in its flat buffer: (position, offset, numel, shape) of those
    holding elements, and the distinct shapes of the zero-size ones (which hold only their padding)."""

    real: list[tuple[int, int, int, tuple[int, ...]]]
    zero_shapes: list[tuple[int, ...]]
    total: int  # the flat buffer's length


def _layout(group: _Group, paddings: Sequence[int], total: int, what: str) -> _Layout:
    """The layout of a flat buffer of ``total`` elements (stages 1/2); every element accounted for.
    Computed once per group, shared by the weights and every state key; the walks over all declared
    parameters are C-level (a Python step only per parameter holding elements)."""
    sizes = group.numels
    ends = list(accumulate(map(add, sizes, paddings)))  # where each parameter's padding ends
    real: list[tuple[int, int, int, tuple[int, ...]]] = []
    for i in compress(range(len(sizes)), sizes):  # (the ends only grow: the first too long is the first in order)
        n, pad = sizes[i], paddings[i]
        offset = ends[i] - pad - n
        if offset + n > total:
            raise LoadError(f"{what}: flat partition of {total} elements ends inside {group.names[i]} "
                            f"{list(group.shapes[i])}")
        real.append((i, offset, n, group.shapes[i]))
    offset = ends[-1] if ends else 0
    if offset != total:
        raise LoadError(f"{what}: flat partition of {total} elements, but param_shapes account for {offset}")
    return _Layout(real, group.zero_shapes, total)


def _cut(flat: _Flat, layout: _Layout, what: str) -> _Pieces:
    """Parameter tensors out of a group's flat buffer (views): a tensor per parameter holding elements,
    one (empty, immutable) view per zero-size shape."""
    if flat.numel() != layout.total:
        raise LoadError(f"{what}: flat partition of {flat.numel()} elements, but param_shapes account for "
                        f"{layout.total}")
    return _Pieces({i: flat.view(off, n, shape) for i, off, n, shape in layout.real},
                   {shape: flat.empty(shape) for shape in layout.zero_shapes})


def _cut_stage12(zero: Sequence[Mapping[str, Any]], shapes: list[_Group], what: str, *, masters: bool = True
                 ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The fp32 master weights by name (only checked, not kept, with ``masters=False``), the state by
    name, the param groups (their ``params``: the names)."""
    n = len(shapes)
    params: dict[str, Any] = {}
    state: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    ranks = [(z.get("single_partition_of_fp32_groups", ()),
              _ints(z.get("group_paddings"), n, f"{what}: group_paddings"), z.get("base_optimizer_state"))
             for z in zero]
    for r, (fp32, _, _) in enumerate(ranks):
        if not isinstance(fp32, list) or len(fp32) != n:
            raise LoadError(f"{what}: rank {r} has {len(fp32) if isinstance(fp32, list) else 'no'} fp32 partitions "
                            f"for {n} param group(s)")
    if "zero_stage" not in zero[0]:  # bf16 ZeRO 1 (BF16_Optimizer) saves its fp32 partitions with their padding
        ranks = [([_view(_tensor(t, what), 0, (max(0, t.numel() - p),)) for t, p in zip(fp32, pads)], pads, base)
                 for fp32, pads, base in ranks]
    counts = zero[0].get("partition_count")
    if isinstance(counts, list) and any(c != len(zero) for c in counts):
        raise LoadError(f"{what}: partition_count {counts}, but {len(zero)} optimizer file(s) found")
    align = zero[0].get("param_alignment_paddings")
    if align is not None and (not isinstance(align, list) or len(align) != n):
        raise LoadError(f"{what}: param_alignment_paddings has {len(align) if isinstance(align, list) else 'no'} "
                        f"list(s) for {n} param group(s)")
    hp = _hparams(ranks[0][2], n, what) if isinstance(ranks[0][2], dict) else None
    for g, group in enumerate(shapes):
        size = len(group.names)
        pads = _ints(align[g], size, f"{what}: param_alignment_paddings[{g}]") if isinstance(align, list) \
            else [0] * size
        where = f"{what}: group {g}"
        flat = _Flat([_tensor(fp32[g], where) for fp32, _, _ in ranks])
        layout = _layout(group, pads, flat.numel(), where)
        if masters:
            params.update(zip(group.names, _cut(flat, layout, where).listed(group)))
        per_key: dict[str, list[Any]] = {}
        scalars: dict[str, Any] = {}
        for r, (fp32, padding, base) in enumerate(ranks):
            entry = _stage12_entry(base, g, f"{what} (rank {r})")
            for k, v in entry.items():
                if is_tensor(v) and v.dim() == 1:
                    lean = fp32[g].numel()
                    if v.numel() not in (lean, lean + padding[g]):
                        raise LoadError(f"{where}: state {k!r} has {v.numel()} elements for a partition of {lean}")
                    per_key.setdefault(k, []).append(_view(v, 0, (lean,)))
                elif r == 0:
                    scalars[k] = v
        cut = {k: _cut(_Flat(v), layout, f"{where}, state {k!r}") for k, v in per_key.items()}
        mine = _fill_state(group, scalars, cut)
        if state:
            state.update(mine)
        else:  # (the first group's taken as it is, not copied)
            state = mine
        hparams = hp[g] if hp is not None else {}
        groups.append({**{k: v for k, v in hparams.items() if k != "params"}, "params": list(group.names)})
    return params, state, groups


def _fill_state(group: _Group, scalars: Mapping[str, Any], cut: Mapping[str, _Pieces]) -> dict[str, dict[str, Any]]:
    """Each parameter's state by name, in the group's order: its own copy of the scalar entries (``step``) and
    its cut pieces. The zero-size parameters (nothing to update) share one state dict per shape (one
    copy of the scalars, the shape's empty pieces), so that a file declaring many of them costs a slot
    in ``state`` each, neither tensors nor dicts."""
    zero = group.zero_shapes
    shared = {k: _own(v) for k, v in scalars.items()} if zero else {}
    by_shape = {shape: {**shared, **{k: c.empty[shape] for k, c in cut.items()}} for shape in zero}
    # every name's slot made at C level (the real ones are filled in below, in place: the order stays)
    if len(zero) == 1:
        mine = dict.fromkeys(group.names, by_shape[zero[0]])
    else:
        mine = dict(zip(group.names, map(by_shape.get, group.shapes)))  # type: ignore[arg-type]
    columns = [(k, c.views) for k, c in cut.items()]
    for i in compress(range(len(group.numels)), group.numels):  # (C-level: only the parameters holding elements)
        own = {k: _own(v) for k, v in scalars.items()}
        own.update({k: views[i] for k, views in columns})
        mine[group.names[i]] = own
    return mine


def _stage12_entry(base: Any, g: int, what: str) -> dict[str, Any]:
    """Group ``g``'s flat optimizer state: the torch state dict (rigid) or the list of lean states (elastic)."""
    if isinstance(base, list):
        entry = base[g] if g < len(base) else None
    elif isinstance(base, dict) and isinstance(base.get("state"), dict):
        group = _hparams(base, len(base.get("param_groups") or ()), what)[g]
        idx = group.get("params")
        if not isinstance(idx, list) or len(idx) != 1 or type(idx[0]) not in (int, str):
            raise LoadError(f"{what}: base_optimizer_state param_groups[{g}]['params'] is {_short(idx)}, not the "
                            "one index of a flat group")
        entry = base["state"].get(idx[0])
    else:
        raise LoadError(f"{what}: base_optimizer_state is {type(base).__name__}, not an optimizer state")
    if entry is None:
        return {}
    return _dict(entry, f"{what}: group {g} state")


def _cut_stage3(zero: Sequence[Mapping[str, Any]], shapes: list[_Group],
                what: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    world = len(zero)
    count = zero[0].get("partition_count")
    if isinstance(count, int) and count != world:
        raise LoadError(f"{what}: partition_count {count}, but {world} optimizer file(s) found")
    flats: list[_Flat] = []
    keyed: list[dict[str, _Flat]] = []
    scalars: dict[str, Any] = {}
    base0 = _dict(zero[0].get("optimizer_state_dict"), f"{what}: optimizer_state_dict")
    for r, z in enumerate(zero):
        where = f"{what} (rank {r})"
        subs = z.get("fp32_flat_groups")
        if not isinstance(subs, list) or not subs:
            raise LoadError(f"{where}: fp32_flat_groups is not a list of flat tensors")
        flats.append(_Flat([_tensor(t, where) for t in subs]))
        base = _dict(z.get("optimizer_state_dict"), f"{where}: optimizer_state_dict")
        st = base.get("state")
        groups3 = _hparams(base, len(shapes), where)
        if not all(isinstance(g.get("params"), list) and all(type(i) in (int, str) for i in g["params"])
                   for g in groups3):
            raise LoadError(f"{where}: optimizer_state_dict param_groups' params are not lists of indices")
        order = [i for g in groups3 for i in g["params"]]
        if not isinstance(st, dict) or len(order) != len(subs):
            raise LoadError(f"{where}: optimizer state does not match its {len(subs)} fp32 sub-group(s)")
        per_key: dict[str, list[Any]] = {}
        for i, sub in zip(order, subs):
            entry = _dict(st.get(i, {}), f"{where}: state {i!r}")
            for k, v in entry.items():
                if is_tensor(v) and v.dim() == 1:
                    if v.numel() != sub.numel():
                        raise LoadError(f"{where}: state {k!r} has {v.numel()} elements "
                                        f"for a sub-group of {sub.numel()}")
                    per_key.setdefault(k, []).append(v)
                elif r == 0:
                    scalars[k] = v
        keyed.append({k: _Flat(v) for k, v in per_key.items() if len(v) == len(subs)})
    flat = _Group([n for g in shapes for n in g.names], [s for g in shapes for s in g.shapes],
                  [n for g in shapes for n in g.numels], list(dict.fromkeys(s for g in shapes for s in g.zero_shapes)))
    params = dict(zip(flat.names, _gather3(flats, flat, what).listed(flat)))
    cut = {k: _gather3([kd[k] for kd in keyed], flat, f"{what}, state {k!r}") for k in keyed[0]
           if all(k in kd for kd in keyed)}
    state = _fill_state(flat, scalars, cut)
    groups = [{**{k: v for k, v in hp.items() if k != "params"}, "params": list(group.names)}
              for hp, group in zip(_hparams(base0, len(shapes), what), shapes)]
    return params, state, groups


def _gather3(flats: Sequence[_Flat], group: _Group, what: str) -> _Pieces:
    """Stage 3: every rank holds a padded ``ceil(numel / world)`` slice of each parameter, in order."""
    world = len(flats)
    out: dict[int, Any] = {}
    empty = {shape: flats[0].empty(shape) for shape in group.zero_shapes}  # nothing on any rank: one view a shape
    offset = 0
    for i in compress(range(len(group.numels)), group.numels):
        name, shape, n = group.names[i], group.shapes[i], group.numels[i]
        part = -(-n // world)
        if any(offset + part > f.numel() for f in flats):
            raise LoadError(f"{what}: flat partition ends inside {name} {list(shape)}")
        out[i] = _Flat.join([f.span(offset, part) for f in flats]).view(0, n, shape)
        offset += part
    if any(f.numel() != offset for f in flats):
        raise LoadError(f"{what}: flat partitions of {[f.numel() for f in flats]} elements, "
                        f"but param_shapes account for {offset} per rank")
    return _Pieces(out, empty)
