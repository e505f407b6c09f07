"""optckpt's own pickler for ``torch.save``'s ``data.pkl``, for objects read by the lazy reader.

An edit that only relabels state (``set``, a ``remap`` that re-keys it) writes back the tensors it
read, unchanged, as references to the records they came from. :func:`dump` writes such an object
as protocol-2 opcodes of the kinds torch's pickler emits for it — a tensor as
``torch._utils._rebuild_tensor_v2`` (``_v3`` for dtypes without a typed storage class) of a
persistent ``("storage", <storage class>, key, location, numel)``, a parameter through
``_rebuild_parameter``, ``OrderedDict`` with its ``_metadata``, ``torch.Size``, dtypes — with no
torch import. Storage keys are the records' keys: the caller copies or keeps those records.

Anything else (a live torch tensor, a placeholder of a pickled object, a type it does not know)
raises :class:`Unpicklable`: the caller writes the object the torch way instead. The result is
read back by the same lazy reader and compared with the object (:func:`same_structure`)."""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from ..gcpause import gc_paused
from ..tensors import DType, RecordTensor, Size

__all__ = ["Unpicklable", "dump", "same_structure"]


class Unpicklable(Exception):
    """The object holds something this pickler does not write: use torch's."""


_ATOMS = frozenset({type(None), bool, int, float, str})
_BATCH = 1000
_U32 = struct.Struct("<I").pack
_INT = frozenset({int})
_SMALL_INTS = [b"K" + bytes((i,)) for i in range(256)]


class _NotInt(Exception):
    pass


def _int(v: Any) -> bytes:
    """The opcode of an int as :meth:`_Writer.atom` writes it (ints of up to 32 bits: the others
    there), for the fast path of tensors' offsets, shapes and strides."""
    if type(v) is not int:
        raise _NotInt
    if 0 <= v < 256:
        return _SMALL_INTS[v]
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)
    raise _NotInt


def _ints(items: tuple[Any, ...]) -> bytes:
    """A tuple of ints as :meth:`_Writer.tuple_of` writes it."""
    n = len(items)
    if n == 0:
        return b")"
    body = b"".join([_int(x) for x in items])
    return b"(" + body + b"t" if n > 3 else body + (b"\x85", b"\x86", b"\x87")[n - 1]


class _Writer:
    def __init__(self, key_of: Callable[[RecordTensor], str]):
        self.out: list[bytes] = [b"\x80\x02"]
        self.memo: dict[int, int] = {}  # id(obj) -> memo index
        self.keep: list[Any] = []  # memoised objects stay alive (ids are not reused)
        self.globals: dict[str, int] = {}
        self.strings: dict[str, int] = {}
        self.key_of = key_of
        self._forms: dict[tuple[str, str, DType], tuple[bytes, bytes, bytes, int]] = {}
        self._ints: dict[tuple[int, ...], bytes] = {}  # shapes / strides (of ints only) as opcodes
        # (shape, stride, offset, storage bytes, requires_grad, bytes an element) -> the opcodes from the
        # storage's numel to requires_grad (see _tensor_fast): a model's tensors share a few geometries
        self._geometries: dict[tuple[Any, ...], bytes] = {}
        self._str_ops: dict[str, bytes] = {}  # short strings' BINUNICODE opcodes
        self.used: list[str] = []  # storage keys as written, repeats included (first-use order: dump)

    def put(self) -> int:
        i = len(self.memo) + len(self.globals) + len(self.strings)
        self.out.append(b"q" + bytes((i,)) if i < 256 else b"r" + struct.pack("<I", i))
        return i

    def get(self, i: int) -> None:
        self.out.append(b"h" + bytes((i,)) if i < 256 else b"j" + struct.pack("<I", i))

    def glob(self, module: str, name: str) -> None:
        full = f"{module}\n{name}\n"
        i = self.globals.get(full)
        if i is not None:
            self.get(i)
            return
        self.out.append(b"c" + full.encode("ascii"))
        self.globals[full] = self.put()

    def string(self, s: str, memo: bool = False) -> None:
        if memo:
            i = self.strings.get(s)
            if i is not None:
                self.get(i)
                return
        b = s.encode("utf-8", "surrogatepass")
        self.out.append(b"X" + struct.pack("<I", len(b)) + b)
        if memo:
            self.strings[s] = self.put()

    def atom(self, v: Any) -> None:
        t = type(v)
        if t is str:  # (the same key strings over and over: their opcodes encoded once)
            op = self._str_ops.get(v)
            if op is None:
                b = v.encode("utf-8", "surrogatepass")
                op = b"X" + _U32(len(b)) + b
                if len(b) <= 64:
                    self._str_ops[v] = op
            self.out.append(op)
        elif t is int and 0 <= v < 256:
            self.out.append(_SMALL_INTS[v])
        elif v is None:
            self.out.append(b"N")
        elif t is bool:
            self.out.append(b"\x88" if v else b"\x89")
        elif t is int:
            if 0 <= v < 256:
                self.out.append(b"K" + bytes((v,)))
            elif 0 <= v < 65536:
                self.out.append(b"M" + struct.pack("<H", v))
            elif -(1 << 31) <= v < (1 << 31):
                self.out.append(b"J" + struct.pack("<i", v))
            else:
                n = (v.bit_length() + 8) // 8
                raw = v.to_bytes(n, "little", signed=True)
                if len(raw) > 255:
                    raise Unpicklable("an integer of more than 255 bytes")
                self.out.append(b"\x8a" + bytes((len(raw),)) + raw)
        elif t is float:
            self.out.append(b"G" + struct.pack(">d", v))
        else:
            self.string(v)

    def tuple_of(self, items: Any) -> None:
        n = len(items)
        if n == 0:
            self.out.append(b")")
            return
        if n > 3:
            self.out.append(b"(")
        for x in items:
            self.save(x)
        self.out.append(b"t" if n > 3 else (b"\x85", b"\x86", b"\x87")[n - 1])

    def memoised(self, obj: Any) -> bool:
        i = self.memo.get(id(obj))
        if i is None:
            return False
        self.get(i)
        return True

    def remember(self, obj: Any) -> None:
        self.memo[id(obj)] = self.put()
        self.keep.append(obj)

    def setitems(self, items: list[tuple[Any, Any]]) -> None:
        for start in range(0, len(items), _BATCH):
            chunk = items[start:start + _BATCH]
            if len(chunk) == 1:
                self.save(chunk[0][0])
                self.save(chunk[0][1])
                self.out.append(b"s")
                continue
            self.out.append(b"(")
            for k, v in chunk:
                self.save(k)
                self.save(v)
            self.out.append(b"u")

    def save(self, obj: Any) -> None:
        t = type(obj)
        if t in _ATOMS:
            self.atom(obj)
        elif t is RecordTensor:
            self.tensor(obj)
        elif t is dict:
            if self.memoised(obj):
                return
            self.out.append(b"}")
            self.remember(obj)
            self.setitems(list(obj.items()))
        elif t is list:
            if self.memoised(obj):
                return
            self.out.append(b"]")
            self.remember(obj)
            for start in range(0, len(obj), _BATCH):
                chunk = obj[start:start + _BATCH]
                if len(chunk) == 1:
                    self.save(chunk[0])
                    self.out.append(b"a")
                    continue
                self.out.append(b"(")
                for x in chunk:
                    self.save(x)
                self.out.append(b"e")
        elif t is tuple:
            self.tuple_of(obj)
        elif t is OrderedDict:
            if self.memoised(obj):
                return
            self.glob("collections", "OrderedDict")
            self.out.append(b")R")
            self.remember(obj)
            self.setitems(list(obj.items()))
            state = getattr(obj, "__dict__", None)
            if state:
                self.save(dict(state))
                self.out.append(b"b")
        elif t is Counter:
            self.reduce_one(obj, "collections", "Counter", dict(obj))
        elif t is Size:
            self.glob("torch", "Size")
            self.tuple_of(tuple(obj))
            self.out.append(b"\x85R")
        elif t is DType:
            self.glob("torch", obj.name)
        elif t is set:
            self.reduce_one(obj, "__builtin__", "set", list(obj))
        elif t is complex:
            self.glob("__builtin__", "complex")
            self.tuple_of((obj.real, obj.imag))
            self.out.append(b"R")
        elif t is bytes and obj:
            self.glob("_codecs", "encode")
            self.tuple_of((obj.decode("latin1"), "latin1"))
            self.out.append(b"R")
        else:
            raise Unpicklable(f"a value of type {t.__module__}.{t.__qualname__}")

    def reduce_one(self, obj: Any, module: str, name: str, arg: Any) -> None:
        """``module.name(arg)`` (a shared container: memoised), as pickle writes a Counter or a set."""
        if self.memoised(obj):
            return
        self.glob(module, name)
        self.save(arg)
        self.out.append(b"\x85R")
        self.remember(obj)

    def tensor(self, t: RecordTensor) -> None:
        if self.memoised(t):
            return
        if not t.is_parameter:
            form = self._forms.get((t._storage_type, t._location, t.dtype))
            if form is not None and self._tensor_fast(t, form):  # this kind of tensor was written before
                return
        if t.is_parameter:
            self.glob("torch._utils", "_rebuild_parameter")
            self.out.append(b"(")
            inner = RecordTensor(t.source, t.key, t.data_offset, t.storage_nbytes, t.dtype, t.shape, t.stride(),
                                 t.storage_offset(), False, t.location, t.storage_type)
            self.tensor(inner)
            self.atom(t.requires_grad)
            self.glob("collections", "OrderedDict")
            self.out.append(b")Rt")
            self.out.append(b"R")
            self.remember(t)
            return
        untyped = t.storage_type == "UntypedStorage" and t.dtype.name != "uint8"
        self.glob("torch._utils", "_rebuild_tensor_v3" if untyped else "_rebuild_tensor_v2")
        self.out.append(b"(")
        key = self.key_of(t)
        self.used.append(key)
        self.out.append(b"(")  # the persistent id: ("storage", <class>, key, location, numel)
        self.string("storage", memo=True)
        if t.storage_type == "UntypedStorage":
            self.glob("torch.storage", "UntypedStorage")
            numel = t.storage_nbytes
        else:
            self.glob("torch", t.storage_type)
            numel = t.storage_nbytes // t.dtype.itemsize
        self.string(key)
        self.string(t.location, memo=True)
        self.atom(numel)
        self.out.append(b"tQ")
        self.atom(t.storage_offset())
        self.tuple_of(tuple(t.shape))
        self.tuple_of(tuple(t.stride()))
        self.atom(t.requires_grad)
        self.glob("collections", "OrderedDict")
        self.out.append(b")R")
        if untyped:
            self.glob("torch", t.dtype.name)
        self.out.append(b"tR")
        self.remember(t)
        self._learn_form(t, untyped)

    def _learn_form(self, t: RecordTensor, untyped: bool) -> None:
        """Once a kind of tensor (storage class, location, dtype) has been written, every global and
        string it refers to is memoised: its fixed opcodes are the same bytes for every other tensor of
        that kind (see :meth:`_tensor_fast`)."""
        out, self.out = self.out, []
        try:
            self.glob("torch._utils", "_rebuild_tensor_v3" if untyped else "_rebuild_tensor_v2")
            self.out.append(b"((")
            self.string("storage", memo=True)
            if t.storage_type == "UntypedStorage":
                self.glob("torch.storage", "UntypedStorage")
            else:
                self.glob("torch", t.storage_type)
            head = b"".join(self.out)
            self.out = []
            self.string(t.location, memo=True)
            mid = b"".join(self.out)
            self.out = []
            self.glob("collections", "OrderedDict")
            self.out.append(b")R")
            if untyped:
                self.glob("torch", t.dtype.name)
            self.out.append(b"tR")
            tail = b"".join(self.out)
            per = 1 if t.storage_type == "UntypedStorage" else t.dtype.itemsize
        finally:
            self.out = out
        self._forms[(t.storage_type, t.location, t.dtype)] = (head, mid, tail, per)

    def _tensor_fast(self, t: RecordTensor, form: tuple[bytes, bytes, bytes, int]) -> bool:
        """:meth:`tensor`'s opcodes for a tensor whose kind was written before, in one piece (False:
        a value the fast form does not cover, written by :meth:`tensor` instead). The opcodes of its
        geometry (storage numel, offset, shape, stride, requires_grad) are made once per distinct
        geometry. (2.0 == 2 would find 2's entry: the cache relies on a record tensor's geometry being
        ints and a bool, which the lazy reader and ``view_of`` make sure of; another type is refused
        where its entry would be made.)"""
        head, mid, tail, per = form
        at = (t.shape, t._stride, t._offset, t.storage_nbytes, t.requires_grad, per)
        geometry = self._geometries.get(at)
        if geometry is None:
            geometry = self._geometry(*at)
            if geometry is None:
                return False
            self._geometries[at] = geometry
        key = self.key_of(t)
        kb = key.encode("utf-8", "surrogatepass")
        self.out.append(b"".join((head, b"X", _U32(len(kb)), kb, mid, geometry, tail)))
        self.remember(t)
        self.used.append(key)
        return True

    def _geometry(self, shape: Any, stride: Any, offset: Any, nbytes: int, grad: Any, per: int) -> bytes | None:
        """The opcodes of a tensor's storage numel, offset, shape, stride and requires_grad, or None
        where any of them is not the exact type the fast form writes."""
        if type(grad) is not bool or type(shape) is not tuple or type(stride) is not tuple \
                or not set(map(type, (*shape, *stride, offset))) <= _INT:
            return None
        ints = self._ints
        try:
            sb = ints.get(shape)
            if sb is None:
                sb = ints[shape] = _ints(shape)
            tb = ints.get(stride)
            if tb is None:
                tb = ints[stride] = _ints(stride)
            return b"".join((_int(nbytes // per), b"tQ", _int(offset), sb, tb, b"\x88" if grad else b"\x89"))
        except _NotInt:
            return None


def dump(obj: Any, key_of: Callable[[RecordTensor], str]) -> tuple[bytes, list[str]]:
    """``obj`` as ``data.pkl`` bytes, and the storage keys it references (in first-use order).
    ``key_of(t)``: the key the output gives the record that ``t`` views. Raises :class:`Unpicklable`."""
    w = _Writer(key_of)
    with gc_paused():
        w.save(obj)
    w.out.append(b".")
    return b"".join(w.out), list(dict.fromkeys(w.used))


def same_structure(a: Any, b: Any, key_of: Callable[[RecordTensor], str], where: str = "",
                   pairs: dict[str, tuple[RecordTensor, RecordTensor]] | None = None) -> str | None:
    """Where the object ``b`` read back from a written pickle differs from ``a``, the object written
    (None when they agree): container types, keys and order, values, and every tensor's storage key,
    dtype, shape, stride, offset, requires_grad and Parameter-ness. ``pairs``: filled with each
    storage key's first (written, read back) tensor pair, for the caller to compare their bytes."""
    with gc_paused():
        return _first_difference(a, b, key_of, where, pairs)


def _same_tensor(x: RecordTensor, y: RecordTensor, key_of: Callable[[RecordTensor], str]) -> bool:
    """The written tensor ``x`` and the one read back ``y`` agree on storage key and size, offset, shape,
    stride, dtype, requires_grad and Parameter-ness."""
    return (x.storage_nbytes == y.storage_nbytes and x._offset == y._offset and tuple(x.shape) == tuple(y.shape)
            and x._stride == y._stride and (x.dtype is y.dtype or x.dtype.name == y.dtype.name)
            and x.requires_grad == y.requires_grad and x.is_parameter == y.is_parameter and key_of(x) == y.key)


def _first_difference(a: Any, b: Any, key_of: Callable[[RecordTensor], str], where: str,
                      pairs: dict[str, tuple[RecordTensor, RecordTensor]] | None) -> str | None:
    stack: list[tuple[Any, Any, Any]] = [(a, b, None)]  # (written, read back, (parent's path, key) or None)
    while stack:
        x, y, at = stack.pop()
        if type(x) is not type(y):
            return f"{_path(at, where)}: {type(x).__name__} written, {type(y).__name__} read back"
        if type(x) is RecordTensor:
            if not _same_tensor(x, y, key_of):
                return f"{_path(at, where)}: the tensor read back is not the one written"
            if pairs is not None and y.key not in pairs:
                pairs[y.key] = (x, y)
        elif isinstance(x, dict):
            if list(x) != list(y) or getattr(x, "__dict__", None) != getattr(y, "__dict__", None):
                return f"{_path(at, where)}: keys differ"
            for k, v in x.items():  # (tensors, a state entry's usual values, compared here: no stack entry each)
                w = y[k]
                if type(v) is RecordTensor and type(w) is RecordTensor:
                    if not _same_tensor(v, w, key_of):
                        return f"{_path((at, k), where)}: the tensor read back is not the one written"
                    if pairs is not None and w.key not in pairs:
                        pairs[w.key] = (v, w)
                else:
                    stack.append((v, w, (at, k)))
        elif isinstance(x, (list, tuple, set)):
            if len(x) != len(y):
                return f"{_path(at, where)}: lengths differ"
            if isinstance(x, set):
                if x != y:
                    return f"{_path(at, where)}: set members differ"
                continue
            stack.extend([(p, q, (at, i)) for i, (p, q) in enumerate(zip(x, y))])
        elif x != y and not (x != x and y != y):  # NaN is NaN
            return f"{_path(at, where)}: {x!r} written, {y!r} read back"
    return None


def _path(at: Any, where: str) -> str:
    """The path of a node, from its (parent's path, key) chain: built only to name a difference."""
    keys = []
    while at is not None:
        at, k = at
        keys.append(k)
    return (where or "(root)") + "".join(f"[{k!r}]" for k in reversed(keys))
