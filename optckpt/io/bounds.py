"""Work bounded by the input: what a loaded pickle may look like before anything walks it.

A pickle is a graph: its memo lets one small container be referenced any number of times, so a
20 KB file can hold a list that holds the same list 40 times, 25 levels deep ("billion laughs":
40^25 entries when walked as a tree), or a list that contains itself. Every tree walk downstream
(discovery, rendering, equality, rewriting) would then run for ever. One identity-aware pass,
right after loading, measures the object graph in time linear in its *distinct* objects, and
refuses (one line naming the limit) structures whose tree walk would be amplified beyond them,
containers inside themselves, nesting deeper than any real checkpoint has (torch.save itself
cannot write much deeper: its pickler recurses), and tensors that view a tiny storage as a huge one
(stride 0: four bytes in the file, gigabytes once read)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from ..errors import LoadError
from ..tensors import RecordTensor, Size, is_tensor

__all__ = ["MAX_EXPANDED_VIEW", "MAX_NESTING", "check_bounds"]

MAX_NESTING = 256
_AMPLIFICATION = 4  # a tree walk may visit each distinct entry this many times (plus the slack below)
_SLACK = 1_000_000
_LEAF_TYPES = frozenset({str, bytes, int, float, bool, complex, type(None)})
MAX_EXPANDED_VIEW = 64 << 20
# a record tensor is a leaf here: the lazy reader checks its extent as it reads it (a view beyond its
# storage + MAX_EXPANDED_VIEW goes to the torch reader, whose tensors are checked below)
_LEAF_OR_RECORD = _LEAF_TYPES | {RecordTensor}
_FLAT_TYPES: tuple[type, ...] = (list, tuple, Size)  # torch.Size joins once torch is imported (_flat_types)


def _flat_types() -> tuple[type, ...]:
    torch = sys.modules.get("torch")
    return (*_FLAT_TYPES, torch.Size) if torch is not None else _FLAT_TYPES


def _check_methods(o: dict[Any, Any], where: str) -> None:
    """A dict subclass (OrderedDict) whose pickled state (BUILD, which torch's weights-only loader
    allows for OrderedDict) set instance attributes named like its methods (``items = None``):
    every later ``o.items()`` would call what the file chose. Refused; its own attributes that
    replace no method (``_metadata`` on a state dict, a class-level default) are fine."""
    own = getattr(o, "__dict__", None)
    if type(own) is not dict or not own:
        return
    cls = type(o)
    bad = sorted(k for k in own if type(k) is str and callable(getattr(cls, k, None)))
    if bad:
        raise LoadError(f"{where}: an {cls.__name__} whose pickled state replaces its method(s) "
                        f"{', '.join(map(repr, bad[:4]))}{' ...' if len(bad) > 4 else ''}: not a checkpoint; refused")


def _children(o: Any, where: str) -> tuple[int, list[Any]] | None:
    """How many entries ``o`` holds, and those of them that are not plain scalars (None: not a
    container). Scalars are filtered by type in C (``map(type, ...)``): a list of 5 M indices costs
    one pass, not 5 M Python steps."""
    sp = sys.modules.get("optckpt.io.safepickle")  # no placeholder exists before that module is imported
    placeholder = sp.PickledObject if sp is not None else ()
    if type(o) is dict:
        items: Any = [*o.keys(), *o.values()]
    elif isinstance(o, dict):  # the dict's own methods, never what an instance attribute names
        _check_methods(o, where)
        items = [*dict.keys(o), *dict.values(o)]
    elif isinstance(o, Mapping):
        items = [*o.keys(), *o.values()]
    elif isinstance(o, (list, tuple, set, frozenset)):
        items = o
    elif placeholder and isinstance(o, placeholder):
        items = [o.callable, o.args, o.kwargs, *(v for _, v in o.ops)]
    else:
        return None
    if set(map(type, items)) <= _LEAF_OR_RECORD:
        return len(items), []
    return len(items), [c for c in items if type(c) not in _LEAF_OR_RECORD]


def _check_extent(t: Any, where: str) -> None:
    """A tensor whose elements overlap in memory (stride 0, an expanded view) is fine, unless reading
    it would materialise much more than its file holds: a 4-byte storage viewed as 10^9 elements."""
    nbytes = t.numel() * t.element_size()
    if nbytes <= MAX_EXPANDED_VIEW:
        return
    if type(t) is RecordTensor:
        stored = t.storage_nbytes
    else:
        import torch

        if t.layout != torch.strided or t.device.type == "meta":
            return
        try:
            stored = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return
    if nbytes > stored + MAX_EXPANDED_VIEW:
        raise LoadError(f"{where}: a tensor of shape {tuple(t.shape)} (strides {t.stride()}) views a "
                        f"{stored:,}-byte storage: reading it would materialise {nbytes:,} bytes "
                        f"(limit: its storage + {MAX_EXPANDED_VIEW >> 20} MiB); refused")


class _Memory:
    """The bytes of the distinct storages and arrays a load made, against what its file can hold.
    A file's records hold at most its size; anything else a pickle can only make from a count (an
    allowlisted constructor: ``torch.Tensor(2**31)``, ``UntypedStorage(n)``, numpy's
    ``_reconstruct(ndarray, (n,), ...)``, ``bytearray(n)`` where torch's own loader reads the file),
    memory not bounded by the file: refused past its size again (+ :data:`MAX_EXPANDED_VIEW`)."""

    __slots__ = ("where", "limit", "seen", "total")

    def __init__(self, where: str, file_size: int):
        self.where, self.limit = where, 2 * file_size + MAX_EXPANDED_VIEW
        self.seen: set[tuple[int, int]] = set()
        self.total = 0

    def add(self, o: Any) -> None:
        if type(o) is RecordTensor:
            return  # (its record: bytes of the file)
        torch = sys.modules.get("torch")
        np = sys.modules.get("numpy")
        if torch is not None and isinstance(o, torch.Tensor):
            if o.layout != torch.strided or o.device.type == "meta":
                return
            try:
                st = o.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return
            key, n = (st.data_ptr(), st.nbytes()), st.nbytes()
        elif torch is not None and isinstance(o, (torch.UntypedStorage, torch.storage.TypedStorage)):
            if o.device.type == "meta":
                return
            key, n = (o.data_ptr(), o.nbytes()), o.nbytes()
        elif np is not None and type(o) is np.ndarray:
            key, n = (o.__array_interface__["data"][0], o.nbytes), o.nbytes
        elif type(o) is bytearray:  # (torch's own loader, for files it reads, makes one from a count as asked)
            key, n = (id(o), len(o)), len(o)
        else:
            return
        if n and key not in self.seen:
            self.seen.add(key)
            self.total += n
            if self.total > self.limit:
                raise LoadError(f"{self.where}: its tensors, storages and arrays take {self.total:,} bytes, more than "
                                f"twice the file's {(self.limit - MAX_EXPANDED_VIEW) // 2:,} (+"
                                f"{MAX_EXPANDED_VIEW >> 20} MiB): memory made from a count, not read from the file; "
                                "refused")


def check_bounds(obj: Any, where: str, file_size: int | None = None) -> None:
    """Raise :class:`LoadError` if walking ``obj`` as a tree would not be bounded by its size, or
    (``file_size``: the file it was read from) its tensors, storages and arrays by that file's
    (:class:`_Memory`)."""
    done: dict[int, tuple[int, int]] = {}  # id -> (entries under it as a tree, nesting below it)
    on_path: set[int] = set()
    keep: list[Any] = []  # objects whose ids are in ``done`` stay alive (ids are not reused)
    flat_types = _flat_types()
    memory = _Memory(where, file_size) if file_size is not None else None
    root = _children(obj, where)
    if root is None:
        if is_tensor(obj):
            _check_extent(obj, where)
        if memory is not None:
            memory.add(obj)
        return
    distinct = root[0]
    stack: list[tuple[Any, Iterator[Any], list[int]]] = [(obj, iter(root[1]), [root[0], 0])]
    on_path.add(id(obj))
    while stack:
        node, it, acc = stack[-1]
        for child in it:
            if type(child) is not dict and is_tensor(child):
                _check_extent(child, where)
                if memory is not None:
                    memory.add(child)
                continue
            if type(child) in flat_types and set(map(type, child)) <= _LEAF_TYPES:  # params, betas, shapes
                acc[0] += len(child)
                distinct += len(child)
                acc[1] = max(acc[1], 1)
                continue
            cid = id(child)
            known = done.get(cid)
            if known is not None:
                acc[0] += known[0]
                acc[1] = max(acc[1], known[1] + 1)
                if len(stack) + known[1] >= MAX_NESTING:
                    raise LoadError(f"{where}: containers nested deeper than {MAX_NESTING} levels: not a "
                                    "checkpoint; refused")
                continue
            if cid in on_path:
                raise LoadError(f"{where}: a container holds itself (a reference cycle): not a checkpoint; refused")
            grand = _children(child, where)
            if grand is None:
                if memory is not None:
                    memory.add(child)
                continue
            if len(stack) >= MAX_NESTING:
                raise LoadError(f"{where}: containers nested deeper than {MAX_NESTING} levels: not a checkpoint; "
                                "refused")
            distinct += grand[0]
            if not grand[1]:  # only scalars and record tensors below (a per-parameter state): what pushing
                done[cid] = (grand[0], 0)  # it and popping it again would account, without the round trip
                keep.append(child)
                acc[0] += grand[0]
                acc[1] = max(acc[1], 1)
                if acc[0] > _AMPLIFICATION * distinct + _SLACK:
                    _amplified(where, acc[0], distinct)
                continue
            on_path.add(cid)
            stack.append((child, iter(grand[1]), [grand[0], 0]))
            break
        else:
            stack.pop()
            on_path.discard(id(node))
            done[id(node)] = (acc[0], acc[1])
            keep.append(node)
            if stack:
                parent = stack[-1][2]
                parent[0] += acc[0]
                parent[1] = max(parent[1], acc[1] + 1)
                if parent[0] > _AMPLIFICATION * distinct + _SLACK:
                    _amplified(where, parent[0], distinct)


def _amplified(where: str, walked: int, distinct: int) -> NoReturn:
    raise LoadError(f"{where}: shared references make it more than {walked:,} entries when walked, from "
                    f"{distinct:,} distinct ones (limit {_AMPLIFICATION}x + {_SLACK:,}): a 'billion laughs' "
                    "structure, not a checkpoint; refused")
