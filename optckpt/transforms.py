"""Fuse, split and slice: plan steps that reshape parameters between the old code and the new.

Elementwise optimizers (SGD momentum, Adam(W), RMSprop, Adagrad, Adamax, NAdam, ...) keep every
per-parameter state tensor in the parameter's own shape and update each element on its own, so the
state of ``qkv`` fused from ``q``, ``k``, ``v`` is exactly the concatenation of theirs, and a split is
the exact inverse. Scalar state (``step``) must agree between the parts. Optimizers whose state is
not elementwise (Adafactor's factored moments, LBFGS's flat history, Muon's whole-matrix update) are
refused: no concatenation of their state is the state the fused parameter would have had.

Transforms act on the checkpoint's names after ``--rename`` (the target's namespace): a fuse names
a target parameter and the saved parts it is made of; a split names a saved parameter and the target
parameters it becomes."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import MappingError, TargetError
from .kinds import NOT_ELEMENTWISE, fresh_state_value
from .mapping import IndexName, OptimizerMapping
from .tensors import is_tensor

if TYPE_CHECKING:
    import torch

__all__ = ["TransformRule", "Step", "parse_transforms", "expand_rules", "transform_source", "fuse_tensors",
           "split_tensor", "slice_tensor", "slice_state", "refusal"]

@dataclass(frozen=True)
class TransformRule:
    """One ``--fuse NEW=OLD1+OLD2[@DIM]`` or ``--split OLD=NEW1+NEW2[@DIM]`` option; with ``re:``,
    ``name`` is a pattern and ``parts`` are templates (``\\1``) filled from its groups."""

    kind: str  # "fuse" | "split"
    name: str
    parts: tuple[str, ...]
    dim: int
    regex: bool
    spec: str


@dataclass(frozen=True)
class Step:
    """A concrete transform: ``whole`` is the fused (new) or the split (saved) parameter."""

    kind: str
    whole: str
    parts: tuple[str, ...]
    dim: int

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.whole, "parts": list(self.parts), "dim": self.dim}


def parse_transforms(fuse: Sequence[str] = (), split: Sequence[str] = ()) -> list[TransformRule]:
    return [_parse(kind, s) for kind, specs in (("fuse", fuse), ("split", split)) for s in specs]


def _parse(kind: str, spec: str) -> TransformRule:
    usage = f"--{kind} {spec!r}: expected {'NEW=OLD1+OLD2' if kind == 'fuse' else 'OLD=NEW1+NEW2'}[@DIM]"
    if "=" not in spec:
        raise TargetError(usage)
    name, rhs = spec.split("=", 1)
    dim = 0
    head, at, tail = rhs.rpartition("@")
    if at and re.fullmatch(r"-?\d+", tail):
        rhs, dim = head, int(tail)
    parts = tuple(p.strip() for p in rhs.split("+"))
    if len(parts) < 2 or not all(parts) or not name.strip():
        raise TargetError(usage + " with at least two parts")
    regex = name.startswith("re:")
    if regex:
        name = name[3:]
        try:
            re.compile(name)
        except re.error as e:
            raise TargetError(f"--{kind} {spec!r}: bad regex ({e})") from None
    return TransformRule(kind, name.strip(), parts, dim, regex, spec)


def expand_rules(rules: Sequence[TransformRule], target_names: Sequence[str],
                 saved_names: Sequence[str]) -> list[Step]:
    """Every concrete step the rules describe: a fuse rule matched against the target's names, a
    split rule against the saved ones. A rule that matches nothing, or a name two steps claim, is an
    error (a typo must not pass silently)."""
    steps: list[Step] = []
    for r in rules:
        pool = target_names if r.kind == "fuse" else saved_names
        found = 0
        for n in pool:
            if r.regex:
                m = re.fullmatch(r.name, n)
                if m is None:
                    continue
                try:
                    parts = tuple(m.expand(t) for t in r.parts)
                except (re.error, IndexError) as e:
                    raise TargetError(f"--{r.kind} {r.spec!r}: bad template ({e})") from None
            elif n == r.name:
                parts = r.parts
            else:
                continue
            steps.append(Step(r.kind, n, parts, r.dim))
            found += 1
        if not found:
            where = "target parameter (the new code's names)" if r.kind == "fuse" else \
                "saved parameter (the checkpoint's names after --rename)"
            raise TargetError(f"--{r.kind} {r.spec!r}: matches no {where}")
    claimed = Counter(n for s in steps for n in (s.whole, *s.parts))
    twice = next((n for n, c in claimed.items() if c > 1), None)
    if twice is not None:
        raise TargetError(f"{twice!r} appears in two --fuse / --split steps (or twice in one)")
    return steps


def refusal(optimizer_kind: str) -> str | None:
    """Why state of this optimizer class cannot be fused, split or sliced (None: it can)."""
    why = NOT_ELEMENTWISE.get(optimizer_kind)
    return f"{optimizer_kind} {why}" if why else None


# --- tensors --------------------------------------------------------------------------------------

def _cat_shape(shapes: Sequence[tuple[int, ...]], dim: int, what: str) -> tuple[int, ...]:
    first = shapes[0]
    d = dim % len(first) if first else 0
    if not first or any(len(s) != len(first) or s[:d] + s[d + 1:] != first[:d] + first[d + 1:] for s in shapes):
        raise MappingError(f"{what}: shapes {[list(s) for s in shapes]} cannot be concatenated along dim {dim}")
    return first[:d] + (sum(s[d] for s in shapes),) + first[d + 1:]


def fuse_tensors(parts: Sequence[torch.Tensor], dim: int, what: str) -> torch.Tensor:
    import torch

    _cat_shape([tuple(t.shape) for t in parts], dim, what)
    return torch.cat(list(parts), dim)


def split_tensor(t: torch.Tensor, sizes: Sequence[int], dim: int) -> list[torch.Tensor]:
    """Pieces with storages of their own (a saved view would carry the whole storage)."""
    import torch

    return [p.clone() for p in torch.split(t, list(sizes), dim)]


def _overlap(a: Sequence[int], b: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, min(x, y)) for x, y in zip(a, b))


def slice_tensor(saved: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """``init``'s shape: the region both share from ``saved``, the rest from ``init``."""
    out = init.detach().to(dtype=saved.dtype, device=saved.device).clone()
    region = _overlap(saved.shape, init.shape)
    out[region] = saved[region]
    return out


def _is_scalar(v: Any) -> bool:
    return not is_tensor(v) or v.dim() == 0


def _same(a: Any, b: Any) -> bool:
    import torch

    if is_tensor(a) and is_tensor(b):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    return bool(a == b)


def _copy(v: Any) -> Any:
    return v.clone() if is_tensor(v) else v


def slice_state(entry: Mapping[str, Any], old: tuple[int, ...], new: tuple[int, ...], hparams: Mapping[str, Any],
                name: str) -> dict[str, Any]:
    """A state entry for the parameter grown / shrunk from ``old`` to ``new``: each parameter-shaped
    tensor keeps the shared region, the rest starts where torch starts it (zero moments, Adagrad's
    ``sum`` at ``initial_accumulator_value``); scalar state such as ``step`` is kept."""
    import torch


    if len(old) != len(new):
        raise MappingError(f"{name}: shape {list(old)} -> {list(new)} changes the number of dimensions: "
                           "it cannot be sliced (use --shape-mismatch reset)")
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if _is_scalar(v):
            out[k] = _copy(v)
        elif tuple(v.shape) == old:
            out[k] = slice_tensor(v, torch.full(new, fresh_state_value(k, hparams), dtype=v.dtype, device=v.device))
        else:
            raise MappingError(f"{name}: state {k!r} of shape {list(v.shape)} is not shaped like the parameter "
                               f"{list(old)}: it cannot be sliced (use --shape-mismatch reset)")
    return out


# --- optimizer state ------------------------------------------------------------------------------

def _fuse_entry(entries: Sequence[Mapping[str, Any] | None], shapes: Sequence[tuple[int, ...]], dim: int,
                what: str) -> dict[str, Any] | None:
    import torch

    if all(not e for e in entries):
        return None  # stateless (plain SGD, or never stepped): nothing to fuse
    if any(not e for e in entries) or any(set(e or ()) != set(entries[0] or ()) for e in entries):
        raise MappingError(f"{what}: the parts do not hold the same state keys (some never stepped?): "
                           "their state cannot be fused")
    out: dict[str, Any] = {}
    for k in entries[0] or ():
        vals = [e[k] for e in entries if e]
        if all(is_tensor(v) and v.dim() > 0 and tuple(v.shape) == s for v, s in zip(vals, shapes)):
            out[k] = torch.cat(vals, dim)
        elif all(_is_scalar(v) for v in vals):
            if not all(_same(vals[0], v) for v in vals[1:]):
                shown = ", ".join(str(v.item() if is_tensor(v) else v) for v in vals)
                raise MappingError(f"{what}: state {k!r} differs between the parts ({shown}): they were not "
                                   "stepped together, so no fused state continues all of them")
            out[k] = _copy(vals[0])
        else:
            raise MappingError(f"{what}: state {k!r} is not shaped like the parameters (not elementwise): "
                               "it cannot be fused")
    return out


def _split_entry(entry: Mapping[str, Any] | None, shape: tuple[int, ...], sizes: Sequence[int], dim: int,
                 what: str) -> list[dict[str, Any] | None]:
    if not entry:
        return [None] * len(sizes)
    pieces: list[dict[str, Any]] = [{} for _ in sizes]
    for k, v in entry.items():
        if is_tensor(v) and v.dim() > 0 and tuple(v.shape) == shape:
            for p, t in zip(pieces, split_tensor(v, sizes, dim)):
                p[k] = t
        elif _is_scalar(v):
            for p in pieces:
                p[k] = _copy(v)
        else:
            raise MappingError(f"{what}: state {k!r} is not shaped like the parameter (not elementwise): "
                               "it cannot be split")
    return list(pieces)


def transform_source(mapping: OptimizerMapping, state: Mapping[Any, Any], steps: Sequence[Step],
                     to_target: Any, target_shapes: Mapping[str, tuple[int, ...]],
                     optimizer_kind: str) -> tuple[OptimizerMapping, dict[Any, Any]]:
    """The saved optimizer as if the old code had had the fused / split parameters: their entries
    (named in the target's namespace, evidence ``fuse`` / ``split``) and state replace the parts'.
    ``to_target`` renames a saved name into the target's namespace."""
    new_state = dict(state)
    if not steps:
        return mapping, new_state
    why = refusal(optimizer_kind)
    if why:
        s = steps[0]
        raise MappingError(f"--{s.kind} {s.whole}: {why}: its state cannot be {s.kind}{'d' if s.kind == 'fuse' else ''}"
                           " exactly (reset those parameters instead: --shape-mismatch reset / optckpt reset)")
    if mapping.evidence == "fqn":
        raise MappingError("--fuse / --split are not supported for DCP checkpoints yet: `optckpt convert --to torch`")
    for n in {n for s in steps for n in (s.whole, *s.parts)}:
        if to_target(n) != n:
            raise MappingError(f"{n!r} would itself be renamed by --rename: write --fuse / --split in the new "
                               "code's names")
    pos: dict[str, int] = {}
    for i, e in enumerate(mapping.entries):
        if e.name is not None:
            pos[to_target(e.name)] = i
    wanted = {n for s in steps for n in ((*s.parts,) if s.kind == "fuse" else (s.whole,))}
    for e in mapping.entries:
        if e.name is None and wanted & {to_target(c) for c in e.candidates}:
            raise MappingError(f"index {e.index} may be {', '.join(e.candidates[:4])}: a --fuse / --split part "
                               "needs a certain name (pass --source)")
    ints = [e.index for e in mapping.entries if isinstance(e.index, int)]
    fresh = max(ints, default=-1) + 1
    rows: list[list[IndexName]] = [[e] for e in mapping.entries]
    for s in steps:
        what = f"--{s.kind} {s.whole}"
        if s.kind == "fuse":
            missing = [p for p in s.parts if p not in pos]
            if missing:
                raise MappingError(f"{what}: the checkpoint has no parameter {missing[0]!r} to fuse")
            es = [mapping.entries[pos[p]] for p in s.parts]
            if len({e.group for e in es}) > 1:
                raise MappingError(f"{what}: the parts sit in different param groups "
                                   f"({sorted({e.group for e in es})}): their hyperparameters differ")
            shapes = [e.shape or target_shapes.get(p) for e, p in zip(es, s.parts)]
            if any(sh is None for sh in shapes):
                raise MappingError(f"{what}: the parts' shapes are unknown")
            shape = _cat_shape(shapes, s.dim, what)  # type: ignore[arg-type]
            want = target_shapes.get(s.whole)
            if want is not None and tuple(want) != shape:
                raise MappingError(f"{what}: the parts add up to {list(shape)}, the new code's parameter is "
                                   f"{list(want)}")
            entry = _fuse_entry([state.get(e.index) for e in es], shapes, s.dim, what)  # type: ignore[arg-type]
            for e in es:
                new_state.pop(e.index, None)
                rows[pos[to_target(e.name or "")]] = []
            if entry is not None:
                new_state[fresh] = entry
            rows[pos[s.parts[0]]] = [IndexName(fresh, es[0].group, s.whole, (s.whole,), shape, entry is not None,
                                               "fuse")]
            fresh += 1
        else:
            if s.whole not in pos:
                raise MappingError(f"{what}: the checkpoint has no parameter {s.whole!r} to split")
            e = mapping.entries[pos[s.whole]]
            part_shapes = [target_shapes.get(p) for p in s.parts]
            if e.shape is None or any(sh is None for sh in part_shapes):
                raise MappingError(f"{what}: needs the shapes of the saved parameter and of every new part "
                                   "(give --target as code)")
            if _cat_shape(part_shapes, s.dim, what) != e.shape:  # type: ignore[arg-type]
                raise MappingError(f"{what}: the parts {[list(p) for p in part_shapes if p]} do not add up to the "
                                   f"saved {list(e.shape)} along dim {s.dim}")
            sizes = [p[s.dim] for p in part_shapes if p]
            pieces = _split_entry(state.get(e.index), e.shape, sizes, s.dim, what)
            new_state.pop(e.index, None)
            row = []
            for name, shape, piece in zip(s.parts, [p for p in part_shapes if p], pieces):
                if piece is not None:
                    new_state[fresh] = piece
                row.append(IndexName(fresh, e.group, name, (name,), shape, piece is not None, "split"))
                fresh += 1
            rows[pos[s.whole]] = row
    entries = [e for row in rows for e in row]
    sizes_now = Counter(e.group for e in entries)
    group_sizes = [sizes_now.get(g, 0) for g in range(len(mapping.group_sizes))] if mapping.group_sizes else []
    notes = [*mapping.notes, *(f"{s.kind}: {s.whole} = {' + '.join(s.parts)} along dim {s.dim}" for s in steps)]
    return replace(mapping, entries=entries, group_sizes=group_sizes, basis=None, notes=notes), new_state
