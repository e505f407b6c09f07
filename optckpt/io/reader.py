"""A reader of ``torch.save`` zip files of optckpt's own: the records the zip parse checked, the
pickle decoded at C speed, one memory mapping for every tensor.

``torch.load(weights_only=True)`` decodes ``data.pkl`` with a pure-Python opcode loop and does
per-storage work in Python (~55-65 µs a stored tensor: 40 s for a 600k-storage Adam checkpoint).
Here the same pickle runs through Python's C ``pickle.Unpickler`` with two hooks:

- ``find_class`` returns only the exact ``(module, name)`` pairs of the safe reader's allowlist
  (torch's weights-only table plus numpy's array constructors, :func:`safepickle.allowed`). Any
  other global stops this reader (:class:`NeedsPlaceholders`) and the caller reads the file with
  the inert-placeholder reader instead, as it did after torch's refusal: nothing else is imported,
  looked up or called.
- ``persistent_load`` resolves a storage reference to the record the zip parse found for it (its
  size must be exactly what the pickle reads: the same rule torch's ``mmap`` and plain reads agree
  on) and slices it from one private, read-only-in-effect mapping of the file (``MAP_PRIVATE``:
  writes stay in this process), as ``torch.load(mmap=True)`` does.

So the bytes whose CRC the parse checked are the bytes decoded (no second read of ``data.pkl``),
and every tensor comes from a record of the directory that was checked.

The lazy reader (:func:`read_zip_pickle_lazy`) runs the same C loop with torch's objects replaced
by stand-ins (record references, :class:`~optckpt.tensors.DType`, :class:`~optckpt.tensors.Size`):
torch is not imported. A file it stops at only because of a global outside its table (DeepSpeed's
loss scaler, a ``Namespace`` of arguments) is read from the same checked bytes by the lazy
placeholder reader (:func:`read_zip_pickle_placeholders`): the safe reader's pure-Python opcode loop
(:class:`~optckpt.io.safepickle.SafeUnpickler`: every such global an inert placeholder) over the same
stand-ins, torch still not imported; what torch's allowlist might read otherwise goes to torch.

The C loop differs from torch's weights-only loop on opcodes torch's never emits for a tensor or
a container (``BUILD``, ``INST`` / ``OBJ``, extension codes): they can only build objects of
allowlisted types, and ``BUILD`` can set no state torch's loader would not: on the lazy reader's
stand-ins (a record tensor, a dtype shared by every read) it goes to torch (``__setstate__`` raises
:class:`~optckpt.tensors.NeedsTorch`), and a tensor or storage the torch-backed loop made and the
pickle changed afterwards is refused (:func:`_check_unbuilt`), as is a tensor with backward hooks
(``torch.save`` writes them empty).
"""

from __future__ import annotations

import io
import os
import pickle
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter, OrderedDict
from collections.abc import Callable
from math import prod
from operator import itemgetter
from typing import Any, NamedTuple

from ..errors import LoadError
from ..gcpause import gc_paused
from ..tensors import DTYPES, STORAGE_DTYPES, DType, NeedsTorch, RecordSource, RecordTensor, Size, view_inside
from .bounds import MAX_EXPANDED_VIEW
from .globals_guard import Globals, load_keeping
from .safepickle import (
    PickledGlobal,
    PickledObject,
    SafeUnpickler,
    bounded_bytearray,
    bounded_encode,
    empty_bytes,
    numpy_allowed,
    walk,
)
from .zipscan import ZipLayout

__all__ = ["NeedsGlobal", "NeedsPlaceholders", "NeedsTorch", "fast_allowed", "lazy_allowed", "read_zip_pickle",
           "read_zip_pickle_lazy", "read_zip_pickle_placeholders"]


class NeedsPlaceholders(Exception):
    """The pickle names a global outside the allowlist: read it with the placeholder reader."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class NeedsGlobal(NeedsTorch):
    """The lazy read stopped at a global outside its table, and at nothing else before it: the lazy
    placeholder reader (:func:`read_zip_pickle_placeholders`) may read the file without torch."""


def _storage_dtype(storage_type: Any) -> Any:
    import torch

    if storage_type is torch.UntypedStorage:
        return torch.uint8
    dtype = getattr(storage_type, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f"a storage reference of type {storage_type!r}")
    return dtype


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> Any:
    """``torch._utils._rebuild_tensor_v2`` for a storage this reader mapped, in a third of its time
    (no per-tensor property lookups); anything else goes to torch's own. Backward hooks, which
    ``torch.save`` always writes empty, are refused when not."""
    import torch

    if type(storage) is not torch.storage.TypedStorage:
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                               backward_hooks, metadata)
    if backward_hooks:
        raise pickle.UnpicklingError("a tensor with pickled backward hooks (torch.save writes none)")
    t = torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage, storage_offset, size, stride)
    if requires_grad is not False:
        t.requires_grad = requires_grad
    if metadata:
        torch._utils.set_tensor_metadata(t, metadata)
    return t


def fast_allowed() -> dict[tuple[str, str], Any]:
    """The safe reader's exact allowlist, with the tensor rebuild above in place of torch's."""
    cached = getattr(fast_allowed, "cache", None)
    if cached is None:
        from .safepickle import allowed

        # (no numpy: the C loop would run BUILD on its dtypes and arrays unchecked; such a file goes to
        # the safe reader, which checks them: safepickle.check_numpy_state)
        cached = {k: v for k, v in allowed().items() if k[0] != "numpy" and not k[0].startswith("numpy.")}
        cached[("torch._utils", "_rebuild_tensor_v2")] = _rebuild_tensor_v2
        fast_allowed.cache = cached  # type: ignore[attr-defined]
    return cached


class _Unpickler(pickle.Unpickler):
    """C opcode loop; globals from the exact allowlist (each class and function kept as it was:
    :mod:`~optckpt.io.globals_guard`), storages from checked records."""

    def __init__(self, data: bytes, allowed: dict[tuple[str, str], Any],
                 storage_for: Callable[[Any, str, str, int], Any], path: str, lazy: bool = False):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._allowed = allowed
        self._storage_for = storage_for
        self._lazy = lazy
        self._path = path
        self._globals = Globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:  # protocol 2 (torch.save's) spells Python 3 names the Python 2 way
            key = NAME_MAPPING.get((module, name)) or (IMPORT_MAPPING.get(module, module), name)
            obj = self._allowed.get(key)
            if obj is None:
                if self._lazy:
                    raise NeedsGlobal(f"{module}.{name}")
                raise NeedsPlaceholders(f"{module}.{name}")
        self._globals.note(obj, f"{module}.{name}")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        return _checked_reference(pid, self._storage_for)

    def checked_load(self) -> Any:
        """``load()``, every class and function the pickle named kept as it was (else the file refused)."""
        return load_keeping(self, self._globals, lambda name: LoadError(
            f"{self._path}: the pickle sets the state of {name} (torch.save writes no such thing; it would change it "
            "for the whole process): not a checkpoint; refused"))


def _checked_reference(pid: Any, storage_for: Callable[[Any, str, str, int], Any]) -> Any:
    """A persistent id as torch writes a storage reference, ``("storage", <storage class>, key,
    location, numel)``, resolved by ``storage_for``; anything else is refused."""
    if type(pid) is not tuple or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
        raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
    _, storage_type, key, location, numel = pid
    if type(key) is bytes:
        key = key.decode("ascii")
    if type(location) is bytes:
        location = location.decode("ascii")
    if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
        raise pickle.UnpicklingError(f"malformed storage reference {str(pid)[:80]}")
    return storage_for(storage_type, key, location, numel)


def _record(records: dict[str, Any], path: str, prefix: str, key: str, nbytes: int) -> Any:
    """The checked record a storage reference names; it must hold exactly the bytes the pickle reads
    (the size torch's mmap and plain reads agree on), else one line."""
    name = f"{prefix}/data/{key}"
    rec = records.get(name)
    if rec is None:
        raise LoadError(f"{path}: the pickle reads storage {key!r}, which the zip does not hold")
    if rec.file_size != nbytes:
        raise LoadError(f"{path}: ambiguous zip structure: the pickle reads {nbytes} bytes from record "
                        f"{name!r}, which holds {rec.file_size}")
    return rec


def read_zip_pickle(path: str, layout: ZipLayout, pickle_bytes: bytes, prefix: str,
                    allowed: dict[tuple[str, str], Any], locations: dict[str, None]) -> Any:
    """Decode ``pickle_bytes`` (the checked ``<prefix>/data.pkl``) of the torch zip ``path`` whose
    structure is ``layout``; storages memory-mapped from their records. Records each storage's saved
    location in ``locations`` (nothing is moved there). Raises :class:`NeedsPlaceholders`,
    :class:`LoadError` (a reference to no record, or to a record of another size), or the
    unpickler's own errors."""
    import torch

    records = {e.filename: e for e in layout.entries}
    whole: list[Any] = []
    loaded: dict[str, tuple[Any, tuple[Any, Any, set[str]]]] = {}  # key -> (storage, what it was made with)

    def storage_for(storage_type: Any, key: str, location: str, numel: int) -> Any:
        made = loaded.get(key)
        if made is not None:
            return made[0]
        dtype = _storage_dtype(storage_type)
        nbytes = numel * torch._utils._element_size(dtype)
        rec = _record(records, path, prefix, key, nbytes)
        locations[location] = None
        if nbytes == 0:
            untyped = torch.UntypedStorage(0)
        else:
            if not whole:
                whole.append(torch.UntypedStorage.from_file(os.fspath(path), False, layout.size))
            untyped = whole[0][rec.data_offset:rec.data_offset + nbytes]
        typed = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        loaded[key] = (typed, (typed.dtype, typed._untyped_storage, set(vars(typed))))
        return typed

    built: list[tuple[Any, ...]] = []  # each tensor rebuilt here, as it was made
    if allowed.get(("torch._utils", "_rebuild_tensor_v2")) is _rebuild_tensor_v2:
        def rebuild(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                    backward_hooks: Any, metadata: Any = None) -> Any:
            t = _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata)
            if type(t) is torch.Tensor:
                built.append((t, t.requires_grad, t.untyped_storage().data_ptr(), t.storage_offset(), t.size(),
                              t.stride()))
            return t

        allowed = {**allowed, ("torch._utils", "_rebuild_tensor_v2"): rebuild}
    # a pickle builds only new, acyclic-in-practice containers: no cycle collection while it does (they
    # would rescan the growing heap again and again: a third of the time at 300k entries)
    with gc_paused():
        try:
            obj = _Unpickler(pickle_bytes, allowed, storage_for, path).checked_load()
        finally:  # what torch.load does after every load: sparse tensors rebuilt above are checked here
            torch._utils._validate_loaded_sparse_tensors()
        _check_unbuilt(path, built, loaded)
    return obj


def _check_unbuilt(path: str, built: list[tuple[Any, ...]], loaded: dict[str, Any]) -> None:
    """No tensor or storage this reader made was given a state by the pickle afterwards. The C
    unpickler's BUILD calls ``Tensor.__setstate__`` (whose legacy forms swap a tensor's data, set its
    ``requires_grad`` and backward hooks) or updates a storage's attributes (its dtype, its bytes);
    torch's weights-only loader only calls ``set_`` on a tensor and refuses the rest. ``torch.save``
    writes no BUILD for either: such a file is refused."""
    for t, requires_grad, ptr, offset, size, stride in built:
        if t._backward_hooks is not None or t.requires_grad is not requires_grad or t.storage_offset() != offset \
                or t.size() != size or t.stride() != stride or t.untyped_storage().data_ptr() != ptr:
            raise LoadError(f"{path}: the pickle sets the state of a tensor after building it (torch.save writes "
                            "no such thing): not a checkpoint; refused")
    for typed, (dtype, untyped, names) in loaded.values():
        if typed.dtype is not dtype or typed._untyped_storage is not untyped or vars(typed).keys() != names:
            raise LoadError(f"{path}: the pickle sets the state of a storage (torch.save writes no such thing): "
                            "not a checkpoint; refused")


# ---- the lazy reader: record references, no torch ----------------------------------------------

class _StorageType(NamedTuple):
    """``torch.<Name>Storage`` / ``torch.UntypedStorage`` as the lazy reader sees it."""

    name: str
    dtype: DType | None  # None: untyped (the dtype comes with _rebuild_tensor_v3)


class _LazyStorage(NamedTuple):
    key: str
    data_offset: int
    nbytes: int
    dtype: DType | None
    location: str
    type_name: str


_UINT8 = DTYPES["uint8"]
_new = tuple.__new__


def _lazy_tensor(source: RecordSource, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                 hooks: Any, dtype: DType | None, metadata: Any) -> RecordTensor:
    """A tensor the lazy reader describes exactly, or :class:`NeedsTorch` (torch then reads it, and
    refuses or accepts it as it always did). Every check is a C-level pass over the tuples: this runs
    once per stored tensor (``v2`` in :func:`_lazy_table` inlines the same checks)."""
    if type(storage) is not _LazyStorage or dtype is None or hooks or metadata or type(requires_grad) is not bool \
            or type(offset) is not int or type(size) is not tuple or type(stride) is not tuple:
        raise NeedsTorch("a tensor outside the plain layout")
    _check_view(storage, offset, size, stride, dtype.itemsize)
    if prod(size) * dtype.itemsize > storage.nbytes + MAX_EXPANDED_VIEW:
        raise NeedsTorch("an expanded view")
    return RecordTensor(source, storage.key, storage.data_offset, storage.nbytes, dtype, size, stride, offset,
                        requires_grad, storage.location, storage.type_name)


def _check_view(storage: _LazyStorage, offset: int, size: tuple[Any, ...], stride: tuple[Any, ...],
                itemsize: int) -> None:
    """The storage is whole elements, and the view one torch's ``set_`` accepts on it
    (:func:`~optckpt.tensors.view_inside`)."""
    if storage.nbytes % itemsize:
        raise NeedsTorch("a storage that is no whole number of elements")
    if not view_inside(offset, size, stride, storage.nbytes // itemsize):
        raise NeedsTorch("a tensor view with unusual arguments, or past its storage")


def _lazy_table(source: RecordSource) -> dict[tuple[str, str], Any]:
    """The lazy reader's globals: each an exact ``(module, name)`` of the safe reader's allowlist
    (tests/test_lazy_reader.py checks that it is a subset), standing in for torch's objects."""

    same_tuple = dict[tuple[int, ...], tuple[int, ...]]().setdefault  # (this load's shapes and strides)

    def v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
           metadata: Any = None) -> RecordTensor:
        # _lazy_tensor inlined: this runs once per stored tensor (600k times in a big Adam checkpoint)
        if type(storage) is not _LazyStorage or hooks or metadata or type(requires_grad) is not bool \
                or type(offset) is not int or type(size) is not tuple or type(stride) is not tuple:
            raise NeedsTorch("a tensor outside the plain layout")
        dtype = storage.dtype or _UINT8  # an untyped storage read by _rebuild_tensor_v2: bytes, as torch does
        itemsize = dtype.itemsize
        nbytes = storage.nbytes
        # _check_view's rules, spelt out for the shapes nearly every tensor has (0, 1 and 2 dimensions:
        # a third of the time of the generic passes over the tuples)
        dims = len(size)
        if dims == 2 and len(stride) == 2:
            a, b = size
            c, d = stride
            ok = type(a) is int and type(b) is int and type(c) is int and type(d) is int and a >= 0 and b >= 0 \
                and c >= 0 and d >= 0 and offset >= 0 and not nbytes % itemsize \
                and (not a or not b or offset + (a - 1) * c + (b - 1) * d < nbytes // itemsize)
            numel = a * b
        elif dims == 1 and len(stride) == 1:
            a, = size
            c, = stride
            ok = type(a) is int and type(c) is int and a >= 0 and c >= 0 and offset >= 0 and not nbytes % itemsize \
                and (not a or offset + (a - 1) * c < nbytes // itemsize)
            numel = a
        elif not dims and not stride:
            ok = offset >= 0 and not nbytes % itemsize and offset < nbytes // itemsize
            numel = 1
        else:
            _check_view(storage, offset, size, stride, itemsize)
            ok, numel = True, prod(size)
        if not ok:
            _check_view(storage, offset, size, stride, itemsize)  # (names what is wrong)
            raise NeedsTorch("a tensor view with unusual arguments")
        if numel * itemsize > nbytes + MAX_EXPANDED_VIEW:
            raise NeedsTorch("an expanded view")  # (the torch reader's tensors meet bounds' extent rule)
        # one tuple for each shape and each stride (checked: ints only, so equal means the same): a parameter
        # and its moments share them, and the pickle's own copies go with the load (~80 MB at 600k tensors)
        return RecordTensor(source, storage.key, storage.data_offset, storage.nbytes, dtype, same_tuple(size, size),
                            same_tuple(stride, stride), offset, requires_grad, storage.location, storage.type_name)

    def v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any,
           metadata: Any = None) -> RecordTensor:
        if type(dtype) is not DType or type(storage) is not _LazyStorage or storage.dtype is not None:
            raise NeedsTorch("a _rebuild_tensor_v3 outside the plain layout")
        return _lazy_tensor(source, storage, offset, size, stride, requires_grad, hooks, dtype, metadata)

    def parameter(data: Any, requires_grad: Any, hooks: Any) -> RecordTensor:
        if type(data) is not RecordTensor or data.is_parameter or type(requires_grad) is not bool or hooks:
            raise NeedsTorch("a parameter outside the plain layout")
        p = RecordTensor(data.source, data.key, data.data_offset, data.storage_nbytes, data.dtype, data.shape,
                         data.stride(), data.storage_offset(), requires_grad, data.location, data.storage_type)
        p.is_parameter = True
        return p

    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): v2, ("torch._utils", "_rebuild_tensor_v3"): v3,
        ("torch._utils", "_rebuild_parameter"): parameter, ("collections", "OrderedDict"): OrderedDict,
        ("collections", "Counter"): Counter, ("builtins", "set"): set, ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bounded_bytearray, ("_codecs", "encode"): bounded_encode,
        ("builtins", "bytes"): empty_bytes, ("torch", "Size"): Size,
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None),
    }
    for name, dt in STORAGE_DTYPES.items():
        table[("torch", name)] = _StorageType(name, dt)
    for name, dt in DTYPES.items():
        table[("torch", name)] = dt
    return table


def lazy_allowed() -> frozenset[tuple[str, str]]:
    """The exact globals the lazy reader accepts (for the test that they are all allowlisted)."""
    return frozenset(_lazy_table(RecordSource("", 0)))


def _lazy_references(records: dict[str, Any], path: str, prefix: str,
                     locations: dict[str, None]) -> tuple[Callable[[Any], Any], Callable[[], None]]:
    """The lazy readers' ``persistent_load``: a storage reference resolved to a
    :class:`_LazyStorage` of the checked record it names, in one call of a closure for the usual
    reference (a big Adam checkpoint holds 600k of them); what that call does not accept goes to
    :func:`_checked_reference`, whose checks and messages decide. And the ``release`` that empties
    the storage table when the load ends."""
    loaded: dict[str, _LazyStorage] = {}
    data_dir = prefix + "/data/"
    get_loaded, get_record = loaded.get, records.get

    def persistent_load(pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 5:
            tag, storage_type, key, location, numel = pid
            if tag == "storage" and type(key) is str and type(location) is str and type(numel) is int \
                    and numel >= 0:
                st = get_loaded(key)
                if st is not None:  # (a storage met before: whatever type the reference names, as torch)
                    return st
                if type(storage_type) is _StorageType:
                    dt = storage_type.dtype
                    nbytes = numel * dt.itemsize if dt is not None else numel
                    rec = get_record(data_dir + key)
                    if rec is not None and rec.file_size == nbytes:
                        locations[location] = None
                        st = loaded[key] = _new(_LazyStorage, (key, rec.data_offset, nbytes, dt, location,
                                                               storage_type.name))
                        return st
        return _checked_reference(pid, storage_for)

    def storage_for(storage_type: Any, key: str, location: str, numel: int) -> Any:
        st = get_loaded(key)
        if st is not None:
            return st
        if type(storage_type) is not _StorageType:
            raise NeedsTorch("a storage reference of another type")
        nbytes = numel * (storage_type.dtype.itemsize if storage_type.dtype is not None else 1)
        rec = _record(records, path, prefix, key, nbytes)
        locations[location] = None
        st = loaded[key] = _LazyStorage(key, rec.data_offset, nbytes, storage_type.dtype, location,
                                        storage_type.name)
        return st

    return persistent_load, loaded.clear


class _LazyUnpickler(_Unpickler):
    """The unpickler with storage references resolved by :func:`_lazy_references` (the C unpickler
    calls an instance's own ``persistent_load`` function directly). Nothing it holds refers back to
    it: the unpickler, its memo (every object of the pickle) and the storage table go when the load
    ends, not at a cyclic collection."""

    def __init__(self, data: bytes, source: RecordSource, records: dict[str, Any], path: str, prefix: str,
                 locations: dict[str, None]):
        persistent_load, self.release = _lazy_references(records, path, prefix, locations)
        self.persistent_load = persistent_load  # type: ignore[method-assign,assignment]  # (before the C init)
        super().__init__(data, _lazy_table(source), _refuse_storage, path, lazy=True)


def _refuse_storage(storage_type: Any, key: str, location: str, numel: int) -> Any:
    raise AssertionError("the lazy unpickler resolves storages itself")  # (never: its persistent_load does)


def read_zip_pickle_lazy(path: str, layout: ZipLayout, pickle_bytes: bytes, prefix: str,
                         locations: dict[str, None]) -> Any:
    """Decode ``pickle_bytes`` as :func:`read_zip_pickle` does, with every tensor a
    :class:`~optckpt.tensors.RecordTensor` (its checked record, view and dtype) and torch never
    imported. Raises :class:`NeedsTorch` for anything it does not model (:class:`NeedsGlobal` when a
    global outside its table stopped it), :class:`LoadError` as the eager reader does."""
    records = dict(zip(map(_FILENAME, layout.entries), layout.entries))
    source = RecordSource(os.fspath(path), layout.size)
    with gc_paused():
        unpickler = _LazyUnpickler(pickle_bytes, source, records, path, prefix, locations)
        try:
            return unpickler.checked_load()
        finally:
            unpickler.release()
            del unpickler.persistent_load


# ---- the lazy placeholder reader: record references and inert placeholders, no torch ------------

class _LazyPlaceholderUnpickler(SafeUnpickler):
    """The safe reader's opcode loop (pure Python: nothing imported, nothing called outside the exact
    allowlist, every other global an inert :class:`PickledGlobal`) over the lazy reader's table:
    tensors are :class:`~optckpt.tensors.RecordTensor` of the checked records, by the same rules.

    What the torch-backed placeholder reader would decide otherwise goes to it (:class:`NeedsTorch`):
    a ``torch.*`` global outside the lazy table (torch's allowlist may hold it: a device, a sparse or
    subclassed tensor), a tensor the lazy reader does not describe, ``BUILD`` on a tensor."""

    dispatch: dict[int, Any] = dict(SafeUnpickler.dispatch)

    def __init__(self, data: bytes, source: RecordSource, records: dict[str, Any], path: str, prefix: str,
                 locations: dict[str, None]):
        super().__init__(io.BytesIO(data), table=_lazy_table(source), encoding="utf-8")
        self.persistent_load, self.release = _lazy_references(records, path, prefix, locations)
        self.made: list[PickledObject] = []  # every placeholder object built, for the check after the load
        self._numpy = False

    def find_class(self, module: str, name: str) -> Any:
        key = self._py3_key(module, name)
        if key not in self._allowed:
            for m in {module, key[0]}:
                if m == "torch" or m.startswith("torch."):
                    raise NeedsTorch(f"{module}.{name}")
                if not self._numpy and (m == "numpy" or m.startswith("numpy.")):
                    self._numpy = True  # (as the safe reader: numpy's constructors, when numpy is installed)
                    extra = numpy_allowed()
                    self._allowed.update(extra)
                    self._allowed_ids.update(map(id, extra.values()))
        return super().find_class(module, name)

    def _call(self, func: Any, args: Any) -> Any:
        out = super()._call(func, args)
        if type(out) is PickledObject:
            self.made.append(out)
        return out

    def _made_last(self) -> None:
        if self.stack and type(self.stack[-1]) is PickledObject:
            self.made.append(self.stack[-1])

    def load_newobj(self) -> None:
        super().load_newobj()
        self._made_last()

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        super().load_newobj_ex()
        self._made_last()

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: list[Any]) -> None:
        super()._instantiate(klass, args)
        if isinstance(klass, (PickledGlobal, PickledObject)):  # (built directly, not through _call)
            self._made_last()

    def load_build(self) -> None:
        if len(self.stack) > 1 and type(self.stack[-2]) is RecordTensor:  # torch sets a tensor's state
            raise NeedsTorch("BUILD on a tensor")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _lazy_values_inside(objs: list[PickledObject]) -> bool:
    """Whether a :class:`RecordTensor`, :class:`Size` or :class:`DType` is reachable from the
    placeholder objects ``objs`` (:func:`~optckpt.io.safepickle.walk`: each object once): the writers
    turn the lazy reader's stand-ins into torch's objects only outside placeholders
    (:func:`~optckpt.tensors.materialize`)."""
    return any(type(o) in _STAND_INS for o in walk(objs))


_STAND_INS = frozenset({RecordTensor, Size, DType})


def read_zip_pickle_placeholders(path: str, layout: ZipLayout, pickle_bytes: bytes, prefix: str,
                                 locations: dict[str, None]) -> Any:
    """Decode ``pickle_bytes`` as the torch-backed placeholder reader does (every global outside the
    allowlist an inert placeholder), with tensors as :func:`read_zip_pickle_lazy` gives them and
    torch never imported: for a file the lazy reader left only because of such a global
    (:class:`NeedsGlobal`). Raises :class:`NeedsTorch` where the torch way may read it otherwise,
    also when it holds no placeholder after all (numpy's globals stopped the lazy reader: the torch
    way reads it without placeholders) or a record tensor, Size or dtype inside a placeholder (the
    writers materialise those only outside them); :class:`LoadError` as the lazy reader does; the safe
    reader's own errors."""
    records = dict(zip(map(_FILENAME, layout.entries), layout.entries))
    source = RecordSource(os.fspath(path), layout.size)
    with gc_paused():
        unpickler = _LazyPlaceholderUnpickler(pickle_bytes, source, records, path, prefix, locations)
        try:
            obj = unpickler.load()
            if not unpickler._globals:
                raise NeedsTorch("no placeholder")
            if _lazy_values_inside(unpickler.made):
                raise NeedsTorch("a tensor, Size or dtype inside a pickled object")
            return obj
        finally:
            unpickler.release()
            del unpickler.persistent_load, unpickler.made


_FILENAME = itemgetter(0)
