"""What optckpt knows of a stored tensor without importing torch.

A metadata command (``inspect``, ``check`` against a names file, ``set``, ``remap`` that only
re-keys state) needs each tensor's dtype, shape and place in the file, never its values; importing
torch to build them costs more than the whole command (1.3-2.5 s). The torch-zip reader can hand
out :class:`RecordTensor` instead: a reference to the checked record (offset, size), the view on
it (offset, shape, stride) and the dtype, read from the pickle alone. :func:`is_tensor` is the one
test the rest of the package uses, true for these and for real ``torch.Tensor`` alike (torch is
only consulted once something imported it: no torch tensor exists before that). Values come from
:meth:`RecordTensor.item` (one scalar, decoded with :mod:`struct`) or :meth:`RecordTensor.materialize`
(the real tensor, torch imported then).
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable
from operator import attrgetter, mul
from typing import Any, TypeGuard

__all__ = ["DType", "DTYPES", "STORAGE_DTYPES", "NeedsTorch", "RecordTensor", "RecordSource", "Size", "is_tensor",
           "is_torch_module", "storage_identity", "materialize", "has_record_tensors", "view_key"]


class NeedsTorch(Exception):
    """The lazy reader met what it does not model (a global beyond tensors, dtypes and plain
    containers; a tensor it cannot describe exactly; a pickled state for one of its stand-ins): the
    file is read the torch way instead, which decides between the allowlist, placeholders and
    refusal as before."""


class Size(tuple):  # type: ignore[type-arg]
    """A ``torch.Size`` read without torch: a tuple of ints, written back as a ``torch.Size``."""

    __slots__ = ()


class DType:
    """A torch dtype by name: equal to the torch dtype of that name, printed as torch prints it."""

    __slots__ = ("name", "itemsize", "is_floating_point", "is_complex", "is_signed", "_fmt")

    def __init__(self, name: str, itemsize: int, kind: str, fmt: str = ""):
        self.name, self.itemsize = name, itemsize
        self.is_floating_point = kind == "f"
        self.is_complex = kind == "c"
        self.is_signed = kind in "fci" and name != "float8_e8m0fnu"
        self._fmt = fmt  # struct format of one element ("" when struct has none)

    def __str__(self) -> str:
        return f"torch.{self.name}"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DType):
            return other.name == self.name
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(other, torch.dtype) and str(other) == f"torch.{self.name}"

    def __hash__(self) -> int:
        return hash(f"torch.{self.name}")

    def torch(self) -> Any:
        import torch

        return getattr(torch, self.name)

    # One object per dtype, shared by every read in the process: never changed, never copied. A pickle
    # that sets a state on one (BUILD on ``torch.float32``: ``itemsize`` 1 for every later read) goes
    # to torch, whose loader refuses it.
    def __setattr__(self, name: str, value: Any) -> None:
        if hasattr(self, "_fmt"):
            raise AttributeError(f"torch.{self.name} is read-only")
        object.__setattr__(self, name, value)

    def __setstate__(self, state: Any) -> None:
        raise NeedsTorch("a pickled state for a dtype")

    def __copy__(self) -> DType:
        return self

    def __deepcopy__(self, memo: Any) -> DType:
        return self


def _table() -> dict[str, DType]:
    rows = [("float64", 8, "f", "d"), ("float32", 4, "f", "f"), ("float16", 2, "f", "e"), ("bfloat16", 2, "f", ""),
            ("complex128", 16, "c", ""), ("complex64", 8, "c", ""), ("complex32", 4, "c", ""),
            ("int64", 8, "i", "q"), ("int32", 4, "i", "i"), ("int16", 2, "i", "h"), ("int8", 1, "i", "b"),
            ("uint64", 8, "u", "Q"), ("uint32", 4, "u", "I"), ("uint16", 2, "u", "H"), ("uint8", 1, "u", "B"),
            ("bool", 1, "b", "?"), ("float8_e4m3fn", 1, "f", ""), ("float8_e4m3fnuz", 1, "f", ""),
            ("float8_e5m2", 1, "f", ""), ("float8_e5m2fnuz", 1, "f", ""), ("float8_e8m0fnu", 1, "f", ""),
            ("float4_e2m1fn_x2", 1, "f", "")]
    return {name: DType(name, size, kind, fmt) for name, size, kind, fmt in rows}


DTYPES: dict[str, DType] = _table()
"""Every dtype a ``torch.save`` file can hold whose bytes are plain elements (quantized and bits
dtypes are left to torch: a file holding them is read the torch way)."""

STORAGE_DTYPES: dict[str, DType] = {
    "DoubleStorage": DTYPES["float64"], "FloatStorage": DTYPES["float32"], "HalfStorage": DTYPES["float16"],
    "BFloat16Storage": DTYPES["bfloat16"], "ComplexDoubleStorage": DTYPES["complex128"],
    "ComplexFloatStorage": DTYPES["complex64"], "LongStorage": DTYPES["int64"], "IntStorage": DTYPES["int32"],
    "ShortStorage": DTYPES["int16"], "CharStorage": DTYPES["int8"], "ByteStorage": DTYPES["uint8"],
    "BoolStorage": DTYPES["bool"],
}
"""``torch.<Name>Storage`` (what ``torch.save`` names a typed storage) → its dtype. Dtypes without a
legacy storage class are saved on ``torch.storage.UntypedStorage`` with the dtype passed to
``_rebuild_tensor_v3``. ``tests/test_lazy_reader.py`` checks both tables against the installed torch."""


class RecordSource:
    """One checked torch zip file: where record bytes are read from (one private mapping, made on
    first use), and the torch storage of the whole file once something materialises a tensor."""

    __slots__ = ("path", "size", "_map", "_whole", "_storages")

    def __init__(self, path: str, size: int):
        self.path, self.size = path, size
        self._map: memoryview | None = None
        self._whole: Any = None
        self._storages: dict[str, Any] = {}

    def _mapping(self) -> memoryview:
        if self._map is None:
            with open(self.path, "rb") as f:  # private: writes (none are made) would stay in this process
                self._map = memoryview(mmap.mmap(f.fileno(), self.size, access=mmap.ACCESS_COPY))
        return self._map

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self._mapping()[offset:offset + nbytes]

    def unpack(self, fmt: str, offset: int) -> Any:
        """One value of struct format ``fmt`` at byte ``offset`` of the file."""
        return struct.unpack_from(fmt, self._mapping(), offset)[0]

    def whole(self) -> Any:
        if self._whole is None:
            import torch

            self._whole = torch.UntypedStorage.from_file(os.fspath(self.path), False, self.size)
        return self._whole

    def storage(self, key: str, data_offset: int, nbytes: int) -> Any:
        """The torch storage of one record, the same object for every tensor that views it."""
        st = self._storages.get(key)
        if st is None:
            import torch

            st = torch.UntypedStorage(0) if nbytes == 0 else self.whole()[data_offset:data_offset + nbytes]
            self._storages[key] = st
        return st


view_key: Callable[[RecordTensor], tuple[Any, ...]] = attrgetter("storage_nbytes", "shape", "_stride", "_offset",
                                                                "dtype.name")
"""A record tensor's storage size, shape, stride, storage offset and dtype name, as one tuple (one
C-level call: 600k pairs of tensors are compared by it): two tensors with equal keys are the same view
of storages of one size."""


def view_inside(offset: Any, shape: tuple[Any, ...], stride: tuple[Any, ...], elements: int) -> bool:
    """Whether element ``offset``, ``shape`` and ``stride`` are a view that torch's ``set_`` accepts on a
    storage of ``elements`` elements: ints (not bools), none negative, as many strides as sizes, and the
    last element viewed inside the storage (an empty view: anywhere). The lazy reader's rule for what it
    reads, and :meth:`RecordTensor.view_of`'s for what it makes."""
    if type(offset) is not int or offset < 0 or len(shape) != len(stride):
        return False
    both = (*shape, *stride)
    if both and (not set(map(type, both)) <= _INT or min(both) < 0):
        return False
    return 0 in shape or offset + sum(map(mul, shape, stride)) - sum(stride) < elements


_INT = frozenset({int})


class RecordTensor:
    """A tensor saved in a checked record of a torch zip file, not read: its storage (the record's
    name, data offset and size in bytes), the view on it (element offset, shape, stride) and dtype.
    Two of them share a storage when their ``key`` is the same (tied weights, views). Its offset, shape
    and stride are ints and ``requires_grad`` a bool: the lazy reader and :meth:`view_of` make no
    other (optckpt's pickler writes a tensor's geometry from a cache keyed by them, where 2.0 == 2)."""

    __slots__ = ("source", "key", "data_offset", "storage_nbytes", "dtype", "shape", "_stride", "_offset",
                 "requires_grad", "is_parameter", "_location", "_storage_type")

    def __init__(self, source: RecordSource, key: str, data_offset: int, storage_nbytes: int, dtype: DType,
                 shape: tuple[int, ...], stride: tuple[int, ...], offset: int, requires_grad: bool,
                 location: str, storage_type: str):
        self.source, self.key, self.data_offset, self.storage_nbytes = source, key, data_offset, storage_nbytes
        self.dtype, self.shape, self._stride, self._offset = dtype, shape, stride, offset
        self.requires_grad, self.is_parameter = requires_grad, False
        self._location, self._storage_type = location, storage_type

    def __setstate__(self, state: Any) -> None:
        """A pickle's BUILD on a tensor (``torch.save`` writes none): torch's loader decides what its
        state means; the lazy reader never lets a pickle set a record reference's fields."""
        raise NeedsTorch("BUILD on a tensor")

    def __copy__(self) -> RecordTensor:
        t = RecordTensor(self.source, self.key, self.data_offset, self.storage_nbytes, self.dtype, self.shape,
                         self._stride, self._offset, self.requires_grad, self._location, self._storage_type)
        t.is_parameter = self.is_parameter
        return t

    def __deepcopy__(self, memo: Any) -> RecordTensor:
        return self.__copy__()  # (the file's record, read-only: copies share it, as they share the file)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def element_size(self) -> int:
        return self.dtype.itemsize

    def stride(self) -> tuple[int, ...]:
        return self._stride

    def storage_offset(self) -> int:
        return self._offset

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def location(self) -> str:
        """The device the tensor was saved from (``cpu``, ``cuda:0``): it is read onto the CPU."""
        return self._location

    @property
    def storage_type(self) -> str:
        """What the pickle names the storage: ``FloatStorage``, ... or ``UntypedStorage``."""
        return self._storage_type

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def view_of(self, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> RecordTensor:
        """Another view of the same storage (element ``offset``, ``shape``, ``stride``), as torch's
        ``as_strided`` makes it: a plain tensor (not a parameter) keeping ``requires_grad``. Raises
        ``ValueError`` for a view that is not one of ints reaching no further than the storage (torch
        refuses the same)."""
        if not view_inside(offset, shape, stride, self.storage_nbytes // self.dtype.itemsize):
            raise ValueError(f"a view of shape {list(shape)}, stride {list(stride)} at {offset} outside its storage")
        return RecordTensor(self.source, self.key, self.data_offset, self.storage_nbytes, self.dtype, tuple(shape),
                            tuple(stride), offset, self.requires_grad, self._location, self._storage_type)

    def __repr__(self) -> str:
        return f"RecordTensor({self.key!r}, {self.dtype}, shape={list(self.shape)})"

    def item(self) -> Any:
        """The one value of a one-element tensor (decoded here for plain dtypes, by torch otherwise)."""
        if self.numel() != 1:
            raise ValueError(f"item() of a tensor of {self.numel()} elements")
        fmt = self.dtype._fmt
        size = self.dtype.itemsize
        at = self._offset * size
        if not fmt and self.dtype.name != "bfloat16":
            return self.materialize().item()
        if self.dtype.name == "bfloat16":  # the high half of a float32
            return struct.unpack("<f", b"\0\0" + bytes(self.source.view(self.data_offset + at, 2)))[0]
        return self.source.unpack("<" + fmt, self.data_offset + at)

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self._stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def contiguous_bytes(self) -> memoryview | None:
        """The bytes of the elements it views, straight from the file's mapping, when they lie in one
        row-major run (None for a strided view: :meth:`materialize` it)."""
        if not self.is_contiguous():
            return None
        size = self.dtype.itemsize
        return self.source.view(self.data_offset + self._offset * size, self.numel() * size)

    def materialize(self) -> Any:
        """The real ``torch.Tensor`` (a view of the file's mapping, as the eager reader makes it)."""
        import torch

        dtype = self.dtype.torch()
        untyped = self.source.storage(self.key, self.data_offset, self.storage_nbytes)
        t = torch.empty(0, dtype=dtype).set_(untyped, self._offset, self.shape, self._stride)
        if self.is_parameter:
            return torch.nn.Parameter(t, requires_grad=self.requires_grad)
        if self.requires_grad:
            t.requires_grad = True
        return t


def is_tensor(v: Any) -> TypeGuard[Any]:
    """True for a :class:`RecordTensor` and for a ``torch.Tensor`` (asked only once torch is imported)."""
    if type(v) is RecordTensor:
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


def is_torch_module(v: Any) -> bool:
    """Whether ``v`` is a live ``torch.nn.Module`` (none exists before torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.nn.Module)


def storage_identity(t: Any) -> Any:
    """What two tensors share when they view the same storage: the record for a :class:`RecordTensor`,
    the storage's data pointer for a torch tensor (None when it has none: meta, empty, sparse)."""
    if type(t) is RecordTensor:
        return (t.source.path, t.key) if t.storage_nbytes else None
    try:
        if t.device.type == "meta":
            return None
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ptr


def materialize(obj: Any) -> Any:
    """``obj`` as the eager reader gives it: every :class:`RecordTensor` inside dicts, lists and tuples
    replaced by its real tensor, every :class:`Size` by a ``torch.Size`` and every :class:`DType` by
    the torch dtype (what torch's pickler then writes as torch does). One result per object: what the
    read shares (a storage view, a container) stays shared. Containers are rebuilt only where something
    changed; their types are kept."""
    return _Materialize()(obj)


class _Materialize:
    """:func:`materialize`'s walk, one result per object (an instance, not a recursive closure: that
    would refer to itself, a cycle keeping every tensor it made alive until a cyclic collection)."""

    __slots__ = ("memo",)

    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}

    def __call__(self, v: Any) -> Any:
        walk, memo = self, self.memo
        t = type(v)
        if t in _KEPT:
            return v
        out = memo.get(id(v))
        if out is not None:
            return out
        if t is RecordTensor:
            out = v.materialize()
        elif t is Size:
            import torch

            out = torch.Size(v)
        elif t is DType:
            out = v.torch()
        elif isinstance(v, dict):
            new = {k: walk(x) for k, x in v.items()}
            if all(new[k] is v[k] for k in v):
                out = v
            else:
                out = type(v)() if type(v) is not dict else {}
                try:
                    out.update(new)
                except TypeError:
                    out = new
                for a, val in getattr(v, "__dict__", {}).items():
                    setattr(out, a, val)
        elif isinstance(v, (list, tuple)):
            items = [walk(x) for x in v]
            if all(a is b for a, b in zip(items, v)):
                out = v
            else:
                out = type(v)(items) if type(v) in (list, tuple) else items
        else:
            return v
        memo[id(v)] = out
        return out



_KEPT = frozenset({str, bytes, int, float, bool, complex, type(None)})


def has_record_tensors(objs: Iterable[Any], *, only: bool = False) -> bool:
    """Whether any :class:`RecordTensor` is inside ``objs`` (dicts, lists, tuples); with ``only``, also
    no other tensor (an object our own pickler wrote, not one that torch's wrote after some tensor
    math made real tensors). Each container's entries are sorted by type in C: a 600k-tensor state
    with its 150k-index parameter lists is a few passes, not a Python step per value."""
    found = False
    stack = list(objs)
    while stack:
        v = stack.pop()
        t = type(v)
        if t is RecordTensor:
            if not only:
                return True
            found = True
            continue
        if t in _SCALARS:
            continue
        if isinstance(v, dict):
            items: Any = dict.values(v)  # (dict's own view: never a method the object's state replaced)
        elif isinstance(v, (list, tuple)):
            items = v
        else:
            if only and is_tensor(v):
                return False
            continue
        types = set(map(type, items))
        if RecordTensor in types:
            if not only:
                return True
            found = True
        if not types <= _SCALARS_AND_RECORDS:
            stack.extend([x for x in items if type(x) not in _SCALARS_AND_RECORDS])
    return found


_SCALARS = frozenset({int, float, bool, str, bytes, complex, type(None)})
_SCALARS_AND_RECORDS = _SCALARS | {RecordTensor}
