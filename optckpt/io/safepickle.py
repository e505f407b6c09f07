"""Reading any pickle without running it, and writing it back exactly as it was read.

``torch.load(weights_only=True)`` refuses a file as soon as it names a global outside its rules
(``argparse.Namespace``, a model class, ``HistoryBuffer``). The reader here follows the same rules
for tensors and containers, reads numpy arrays and scalars as data, and turns every other global
into an inert record: :class:`PickledGlobal` (``module.qualname``, never imported) and
:class:`PickledObject` (what the pickle would have built from it: the callable, its arguments, the
items and the ``BUILD`` state, none of it run). Nothing outside a fixed allowlist of exact
``(module, qualname)`` pairs (torch's weights-only set, a few numpy constructors) is ever called,
and ``__setstate__`` runs only on those types.

Writing back: :func:`pickle_module_for` gives ``torch.save`` / ``torch.serialization._save`` a
pickler that re-emits every placeholder as the ``GLOBAL`` / ``REDUCE`` / ``NEWOBJ`` / ``BUILD``
opcodes it was read from, so loading the result with the real classes (full pickle) gives objects
equal to the original ones; nothing is imported to write it.

Work stays bounded by the file: memoised objects are shared references (never copied), and every
walk over placeholders (display, equality, model discovery) visits each object once and stops at
:data:`MAX_DEPTH`."""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import sys
import types
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..tensors import is_tensor

if TYPE_CHECKING:
    import torch


__all__ = ["PickledGlobal", "PickledObject", "SafeUnpickler", "allowed", "bounded_bytearray", "bounded_encode",
           "empty_bytes", "numpy_allowed", "torch_table_bounded", "Refused", "Unbounded", "NotNumpys",
           "safe_load_torch", "pickle_module_for", "has_placeholders", "first_placeholder", "fields_of",
           "is_module_object", "module_tensors", "describe", "same", "walk", "MAX_DEPTH"]

MAX_DEPTH = 64
_COPYREG_WRAPPERS = {("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"), ("copyreg", "_reconstructor")}


class Refused(pickle.UnpicklingError):
    """An allowlisted constructor called as no pickler calls it: refused as it is called, before it
    does anything. ``verdict``: what the one-line error says of it."""

    verdict = "refused"


class Unbounded(Refused):
    """Asked for what the file's bytes do not bound (memory from a count, a codec other than pickle's)."""

    verdict = "work the file does not bound; refused"


class NotNumpys(Refused):
    """A numpy dtype, array or scalar numpy's pickles never make (numpy's C code trusts them)."""

    verdict = "not what numpy pickles (unsafe for numpy to read); refused"


class PickledGlobal:
    """A global the pickle named (a class or a function). Never imported, never called."""

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str):
        self.module = module
        self.qualname = qualname

    @property
    def name(self) -> str:
        """``module.qualname`` as Python 3 spells it (protocol-2 pickles say ``__builtin__.exec``)."""
        from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

        module, qualname = NAME_MAPPING.get((self.module, self.qualname), (self.module, self.qualname))
        return f"{IMPORT_MAPPING.get(module, module)}.{qualname}"

    @property
    def __name__(self) -> str:  # torch's legacy loader names container types in a warning
        return self.qualname

    def __repr__(self) -> str:
        return f"<global {self.name}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PickledGlobal) and (self.module, self.qualname) == (other.module, other.qualname)

    def __hash__(self) -> int:
        return hash((self.module, self.qualname))


class PickledObject:
    """An object the pickle would have built, recorded instead of built.

    ``opcode`` is how it was made: ``reduce`` (``callable(*args)``), ``newobj``
    (``cls.__new__(cls, *args)``), ``newobj_ex`` (with ``kwargs``) or ``obj`` (protocol 0/1
    instantiation); ``ops`` the later ``append`` / ``setitem`` / ``build`` steps, in file order.

    Equality is structural (tensors bit for bit), so a re-read file compares equal to what was
    written; the hash is the identity, so that a hostile file cannot make dict inserts quadratic."""

    __slots__ = ("callable", "args", "kwargs", "opcode", "ops")

    def __init__(self, func: Any, args: Any, opcode: str, kwargs: Any = None):
        self.callable = func
        self.args = args
        self.kwargs = kwargs
        self.opcode = opcode
        self.ops: list[tuple[str, Any]] = []

    @property
    def type_name(self) -> str:
        """The class (or function) it names: ``argparse.Namespace``, ``os.system``."""
        f = self.callable
        if isinstance(f, PickledGlobal):
            if (f.module, f.qualname) in _COPYREG_WRAPPERS and isinstance(self.args, tuple) and self.args \
                    and isinstance(self.args[0], PickledGlobal):
                return self.args[0].name
            return f.name
        if isinstance(f, PickledObject):
            return f"(result of {f.type_name})"
        return type(f).__name__

    @property
    def is_call(self) -> bool:
        """A function call (``os.system(...)``) rather than an object of a class."""
        f = self.callable
        return self.opcode == "reduce" and not (
            isinstance(f, PickledGlobal) and (f.module, f.qualname) in _COPYREG_WRAPPERS) and not self.ops

    @property
    def state(self) -> Any:
        builds = [v for op, v in self.ops if op == "build"]
        return builds[-1] if builds else None

    def __repr__(self) -> str:
        return describe(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PickledObject) and same(self, other)

    def __hash__(self) -> int:
        return id(self)


_PLACEHOLDERS = (PickledGlobal, PickledObject)


# ---------------------------------------------------------------------------------------------
# reading


def allowed() -> dict[tuple[str, str], Any]:
    """Exact ``(module, name)`` → the object torch's weights-only rules allow (already imported by
    torch), plus numpy's array / dtype / scalar constructors when numpy is installed."""
    cached = getattr(allowed, "cache", None)
    if cached is not None:
        return cached
    from torch._weights_only_unpickler import _get_allowed_globals

    out: dict[tuple[str, str], Any] = {}
    for full, obj in _get_allowed_globals().items():
        module, _, name = full.rpartition(".")
        out[(module, name)] = obj
    out.update(numpy_allowed())
    out[("builtins", "bytes")] = empty_bytes
    for key, bounded in _bounded().items():
        if key in out:  # (the same work, bounded by the file)
            out[key] = bounded
    allowed.cache = out  # type: ignore[attr-defined]
    return out


def _bounded() -> dict[tuple[str, str], Any]:
    """torch's allowlisted constructors as optckpt calls them, each bounded by the file (the safe
    reader's table and, for its loads, torch's own: :func:`torch_table_bounded`)."""
    cached = getattr(_bounded, "cache", None)
    if cached is not None:
        return cached
    import torch

    _bounded.cache = {  # type: ignore[attr-defined]
        ("builtins", "bytearray"): bounded_bytearray, ("_codecs", "encode"): bounded_encode,
        ("builtins", "set"): _made_from(set, "set", (list, tuple)),
        ("collections", "Counter"): _made_from(Counter, "Counter", (dict,)),
        ("collections", "OrderedDict"): _made_from(OrderedDict, "OrderedDict", (list, tuple, dict)),
        ("torch", "Size"): _made_from(torch.Size, "torch.Size", (tuple, list)),
        ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): _device_from_cpu_tensor,
        ("torch._utils", "_rebuild_device_tensor_from_numpy"): _device_from_numpy,
        ("torch._utils", "_rebuild_xla_tensor"): _device_from_numpy}
    return _bounded.cache  # type: ignore[attr-defined]


def bounded_bytearray(*args: Any) -> bytearray:
    """``bytearray`` as a pickle makes one (from bytes, or a str and its encoding: what pickle writes;
    a list of ints), never from a count: ``bytearray(2**31)`` would fill 2 GB with zeros for a 20-byte
    pickle, work no longer bounded by the file (torch's loader calls it as given). A str is encoded
    only as :func:`bounded_encode` encodes it."""
    if args and not isinstance(args[0], (bytes, bytearray, str, list, tuple)):
        raise Unbounded(f"a bytearray made from {type(args[0]).__name__} (a count, not bytes of the file)")
    if len(args) > 1:
        return bytearray(bounded_encode(*args))
    return bytearray(*args)


def _made_from(cls: Any, name: str, accepted: tuple[type, ...]) -> Any:
    """``cls`` as pickle calls it: with nothing, or with the one container pickle gives it (a set from
    a list, a Counter from a dict, a Size from a tuple). Given anything else (a tensor or storage made
    from a count, ``set(torch.Tensor(10**9))``), iterating it would be work the file does not bound:
    10**6 elements took 6.4 s and 0.9 GB from a 1 KB pickle."""

    def make(*args: Any) -> Any:
        if len(args) > 1 or (args and type(args[0]) not in accepted):
            raise Unbounded(f"a {name} made from {', '.join(type(a).__name__ for a in args)[:80]} (pickle makes one "
                            f"from {' or '.join(t.__name__ for t in accepted)})")
        return cls(*args)

    make.__qualname__ = make.__name__ = name
    return make


def empty_bytes(*args: Any) -> bytes:
    """``bytes()``: what pickle writes for ``b""`` before protocol 3 (other bytes go through
    :func:`bounded_encode`), an empty numpy array's data among them. Nothing else: ``bytes(n)`` is n
    zero bytes from a count (torch's allowlist has no ``bytes``: it refuses even ``b""``)."""
    if args:
        raise Unbounded(f"bytes made from {type(args[0]).__name__} (pickle writes only bytes() this way)")
    return b""


# what pickle's protocols 0-2 write for bytes (``_codecs.encode(s, "latin1")``), and the default
_ENCODINGS = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "utf_8"})


def bounded_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as a pickle uses it: a str encoded as latin-1 (what pickle writes for bytes
    before protocol 3) or UTF-8, strictly. Any other codec name is refused before it is looked up:
    looking it up imports the ``encodings`` module of that name, some codecs take far more than linear
    time (``punycode``: ~1 ms a character, a 30 KB pickle held ``inspect`` for 10 s, torch's loader
    alike), and an ``errors`` name runs whatever handler some library registered under it."""
    if type(encoding) is not str or encoding.lower() not in _ENCODINGS:
        raise Unbounded(f"_codecs.encode with encoding {str(encoding)[:40]!r} (pickle writes bytes as latin-1 text; "
                        "any other codec is refused)")
    if type(errors) is not str or errors != "strict":
        raise Unbounded(f"_codecs.encode with error handler {str(errors)[:40]!r} (pickle writes none; refused)")
    if type(obj) is not str:
        raise Unbounded(f"_codecs.encode of {type(obj).__name__} (pickle encodes text)")
    return obj.encode(encoding.lower())


@contextlib.contextmanager
def torch_table_bounded() -> Iterator[None]:
    """A context in which torch's own weights-only loader (where optckpt still calls it: legacy
    files, big-endian ones, DCP's byte entries, ``--verify torch``) calls its allowlisted constructors
    as optckpt's readers do (:func:`_bounded`): its table of allowed globals, looked up on every
    ``GLOBAL`` and ``REDUCE``, is swapped for a copy with those for the load. Stricter only for
    pickles no pickler writes; a torch without that table is left as it is."""
    import torch._weights_only_unpickler as wou

    original = getattr(wou, "_get_allowed_globals", None)
    if original is None:
        yield
        return
    table = dict(original())
    for (module, name), bounded in _bounded().items():
        if f"{module}.{name}" in table:
            table[f"{module}.{name}"] = bounded
    setattr(wou, "_get_allowed_globals", lambda: table)  # noqa: B010  (a module attribute mypy types as cached)
    try:
        yield
    finally:
        setattr(wou, "_get_allowed_globals", original)  # noqa: B010


def numpy_allowed() -> dict[tuple[str, str], Any]:
    """The numpy part of :func:`allowed`: array, dtype and scalar constructors (empty without numpy;
    importing numpy imports no torch)."""
    out: dict[tuple[str, str], Any] = {}
    try:
        import numpy  # noqa: F401  (the constructors below import it again when called)
    except ImportError:
        return out
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = _empty_array
        out[(mod, "scalar")] = _scalar
    out[("numpy", "ndarray")] = NDARRAY
    out[("numpy", "dtype")] = _new_dtype
    return out


# numpy's objects are memory-safe only as numpy's own pickles make them. Its C code trusts a dtype's
# pickled state (field offsets past the item, an object field whose flags say "no objects": the
# bytes of the file then read as object pointers, a crash or worse at the first repr or hash), and
# ``scalar(dtype)`` with no bytes makes such pointers itself. So: a dtype is always a new one (never
# numpy's shared float64, which a BUILD would change for the whole process), its BUILD only the
# state numpy writes for it (no fields, flags or sizes of another layout: structured dtypes are not
# read), a scalar only from its bytes, and these reach only the pure-Python reader, whose BUILD
# checks them (:func:`check_numpy_state`), never the C unpickler, which calls ``__setstate__`` as given.

def _new_dtype(spec: Any, align: Any = False, copy: Any = True) -> Any:
    """``numpy.dtype(spec, align, copy)`` as numpy's pickles call it, always a new object."""
    import numpy as np

    if type(spec) is not str or type(align) is not bool or type(copy) is not bool:
        raise NotNumpys(f"numpy.dtype({str(spec)[:40]!r}, ...) (numpy pickles a dtype by its code)")
    return np.dtype(spec, align, True)


def _scalar(*args: Any) -> Any:
    """numpy's ``scalar(dtype, data)`` as numpy pickles a scalar: a dtype and the scalar's bytes (a
    list where the dtype holds objects); without them numpy makes the scalar from nothing."""
    import numpy as np

    if len(args) != 2 or not isinstance(args[0], np.dtype) or type(args[1]) is not (list if args[0].hasobject
                                                                                     else bytes):
        raise NotNumpys(f"a numpy scalar made from ({', '.join(describe(a) for a in args)[:120]})")
    return _multiarray(np).scalar(*args)


def check_numpy_state(inst: Any, state: Any) -> None:
    """Refuse a ``BUILD`` of a numpy dtype or array that numpy's pickles never write: a dtype's state
    must be the one numpy writes for that dtype (its byte order aside), an array's must name a dtype
    and hold bytes (or, for objects, a list)."""
    import numpy as np

    if isinstance(inst, np.dtype):
        if type(state) is tuple and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            same = inst.newbyteorder(state[1]) if state[1] in ("<", ">") else inst
            if same.__reduce__()[2] == state:
                return
        raise NotNumpys(f"a numpy dtype ({inst}) given a state numpy does not write for it (fields, sizes or flags "
                        "of another layout; structured dtypes are not read)")
    if type(state) is not tuple or len(state) != 5 or not isinstance(state[2], np.dtype) \
            or type(state[4]) is not (list if state[2].hasobject else bytes):
        raise NotNumpys("a numpy array given a state numpy does not write (a dtype, then its bytes)")


class _ArrayType:
    """What a pickle's ``numpy.ndarray`` stands for here: the type :func:`_empty_array` makes, and
    nothing callable (``ndarray((n,))`` would make ``n`` bytes the file does not hold)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "numpy.ndarray"


NDARRAY = _ArrayType()


def _empty_array(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's ``_reconstruct`` as numpy's pickles call it: an empty ``ndarray`` (shape ``(0,)``) that
    ``BUILD`` then fills with the bytes of the pickle; any other shape is memory made from a count."""
    import numpy as np

    if subtype is not NDARRAY or type(shape) is not tuple or not set(map(type, shape)) <= {int} or 0 not in shape:
        raise Unbounded(f"numpy's _reconstruct of {describe(subtype)} with shape {str(shape)[:40]} (numpy pickles "
                        "an empty array, then its bytes)")
    return _multiarray(np)._reconstruct(np.ndarray, shape, dtype)


def _multiarray(np: Any) -> Any:
    """numpy's ``multiarray`` module (``numpy._core`` since numpy 2, ``numpy.core`` before)."""
    return getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray


def _device_from_cpu_tensor(data: Any, dtype: Any, device: Any, requires_grad: Any) -> Any:
    """``torch._utils._rebuild_device_tensor_from_cpu_tensor`` onto the CPU (where optckpt reads every
    tensor): a tensor of a storage-less device (XLA, MTIA) saved as its CPU copy, of that copy's dtype
    (torch writes no other: a conversion, or a move, would fill memory the file does not hold)."""
    import torch

    if type(data) is not torch.Tensor or data.dtype != dtype or type(requires_grad) is not bool:
        raise Unbounded("a device tensor rebuilt in another dtype than its saved CPU copy")
    data.requires_grad = requires_grad
    return data


def _device_from_numpy(data: Any, dtype: Any, device: Any, requires_grad: Any) -> Any:
    """``torch._utils._rebuild_device_tensor_from_numpy`` onto the CPU: the saved array as a tensor,
    converted only to a dtype no wider than the array's (torch saves bfloat16 as float32 arrays)."""
    import numpy as np
    import torch

    if type(data) is not np.ndarray or not isinstance(dtype, torch.dtype) or type(requires_grad) is not bool:
        raise Unbounded("a device tensor rebuilt from something other than an array")
    t = torch.from_numpy(data)
    if t.dtype != dtype:
        if dtype.itemsize > t.element_size():
            raise Unbounded(f"a device tensor widened from {t.dtype} to {dtype}")
        t = t.to(dtype=dtype)
    t.requires_grad = requires_grad
    return t


def _buildable(inst: Any) -> bool:
    """Types whose ``BUILD`` (``__setstate__``) is plain data handling in C: numpy arrays and dtypes."""
    np = sys.modules.get("numpy")
    return np is not None and (type(inst) is np.ndarray or isinstance(inst, np.dtype))


_PyUnpickler: Any = pickle._Unpickler  # type: ignore[attr-defined]  # the pure-Python opcode loop
_PyPickler: Any = pickle._Pickler  # type: ignore[attr-defined]


class SafeUnpickler(_PyUnpickler):
    """``pickle``'s own opcode loop with every opcode that imports, calls or mutates replaced.

    ``table``: the exact allowlist (default :func:`allowed`, torch's weights-only set and numpy's
    constructors); the lazy reader passes its own, whose objects stand in for torch's."""

    dispatch: dict[int, Any] = dict(_PyUnpickler.dispatch)

    def __init__(self, file: Any, *, table: dict[tuple[str, str], Any] | None = None, **kwargs: Any):
        super().__init__(file, **kwargs)
        self._globals: dict[tuple[str, str], PickledGlobal] = {}
        self._allowed = allowed() if table is None else table
        self._allowed_ids = {id(v) for v in self._allowed.values()}

    def _py3_key(self, module: str, name: str) -> tuple[str, str]:
        """``(module, name)`` as Python 3 spells it: protocol 0-2 pickles may use Python 2 names,
        which pickle maps (no import)."""
        key = (module, name)
        if self.proto < 3 and self.fix_imports:
            from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

            if key in NAME_MAPPING:
                key = NAME_MAPPING[key]
            elif module in IMPORT_MAPPING:
                key = (IMPORT_MAPPING[module], name)
        return key

    def find_class(self, module: str, name: str) -> Any:
        key = self._py3_key(module, name)
        if key in self._allowed:
            return self._allowed[key]
        ref = self._globals.get((module, name))
        if ref is None:
            ref = self._globals[(module, name)] = PickledGlobal(module, name)
        return ref

    def _call(self, func: Any, args: Any) -> Any:
        if isinstance(func, _PLACEHOLDERS):
            return PickledObject(func, args, "reduce")
        if id(func) not in self._allowed_ids:
            raise pickle.UnpicklingError(f"refusing to call {describe(func)}")
        return func(*args)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        torch = sys.modules.get("torch")  # (not imported: no object of the pickle is a torch type)
        args = self.stack.pop()
        cls = self.stack.pop()
        if isinstance(cls, _PLACEHOLDERS):
            self.append(PickledObject(cls, args, "newobj"))
        elif torch is not None and cls is torch.nn.Parameter:
            self.append(torch.nn.Parameter(*args))
        elif id(cls) in self._allowed_ids and isinstance(cls, type):
            self.append(cls.__new__(cls, *args))
        else:
            raise pickle.UnpicklingError(f"refusing to create {describe(cls)}")

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, _PLACEHOLDERS):
            raise pickle.UnpicklingError(f"refusing to create {describe(cls)}")
        self.append(PickledObject(cls, args, "newobj_ex", kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: list[Any]) -> None:  # INST and OBJ (protocols 0 and 1)
        if isinstance(klass, _PLACEHOLDERS):
            self.append(PickledObject(klass, tuple(args), "obj"))
        else:
            self.append(self._call(klass, tuple(args)))

    def load_build(self) -> None:
        torch = sys.modules.get("torch")  # (not imported: no object of the pickle is a torch type)
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, PickledObject):
            inst.ops.append(("build", state))
        elif torch is not None and type(inst) is torch.Tensor:
            inst.set_(*state)
        elif torch is not None and type(inst) is torch.nn.Parameter:
            inst.__setstate__(state)
        elif type(inst) is OrderedDict:
            inst.__dict__.update(state)
        elif _buildable(inst):
            check_numpy_state(inst, state)
            inst.__setstate__(state)
        else:
            raise pickle.UnpicklingError(f"refusing to set the state of {describe(inst)}")

    dispatch[pickle.BUILD[0]] = load_build

    def _extend(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, PickledObject):
            target.ops.extend(("append", x) for x in items)
        elif type(target) is list:
            target.extend(items)
        else:
            raise pickle.UnpicklingError(f"refusing to append to {describe(target)}")

    def load_append(self) -> None:
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def _setitems(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, PickledObject):
            target.ops.extend(("setitem", (items[i], items[i + 1])) for i in range(0, len(items) - 1, 2))
        elif type(target) in (dict, OrderedDict, Counter):
            for i in range(0, len(items) - 1, 2):
                target[items[i]] = items[i + 1]
        else:
            raise pickle.UnpicklingError(f"refusing to set items of {describe(target)}")

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems(self.stack[-1], [key, value])

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._setitems(self.stack[-1], items)

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise pickle.UnpicklingError(f"refusing to add items to {describe(target)}")
        target.update(items)

    dispatch[pickle.ADDITEMS[0]] = load_additems


def _load(file: Any, **kwargs: Any) -> Any:
    return SafeUnpickler(file, **kwargs).load()


# what torch.serialization's loaders call as ``pickle_module``: ``Unpickler`` and ``load``
_READER = types.SimpleNamespace(__name__=__name__, Unpickler=SafeUnpickler, load=_load)


def safe_load_torch(path: str, map_location: Any, *, zip_format: bool) -> Any:
    """What ``torch.load(path, map_location, mmap=zip_format)`` reads, through :class:`SafeUnpickler`.

    torch's own readers do the container work (records, storages memory-mapped from the file as
    ``torch.load(mmap=True)`` maps them, byte order); TorchScript archives are refused (they would
    run code through ``torch.jit.load``)."""
    import torch

    ser = torch.serialization
    if not zip_format:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "couldn't retrieve source code for container": placeholders have none
            return ser._legacy_load(f, map_location, _READER, encoding="utf-8")
    with ser._open_zipfile_reader(path) as zf:
        if ser._is_torchscript_zip(zf):
            raise pickle.UnpicklingError("a TorchScript archive (torch.jit.load would run its code)")
        import mmap

        shared = ser.get_default_mmap_options() == mmap.MAP_SHARED
        storage = torch.UntypedStorage.from_file(os.fspath(path), shared, os.path.getsize(path))
        return ser._load(zf, map_location, _READER, overall_storage=storage, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# writing


class _SafePickler(_PyPickler):
    """``pickle``'s pickler plus the two placeholder types, written back opcode for opcode."""

    dispatch: dict[type, Any] = dict(_PyPickler.dispatch)

    def save_pickled_global(self, obj: PickledGlobal) -> None:
        if "\n" in obj.module or "\n" in obj.qualname:
            self.save(obj.module)
            self.save(obj.qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + obj.module.encode("utf-8") + b"\n" + obj.qualname.encode("utf-8") + b"\n")
        self.memoize(obj)

    dispatch[PickledGlobal] = save_pickled_global

    def save_pickled_object(self, obj: PickledObject) -> None:
        save, write = self.save, self.write
        if obj.opcode == "obj":
            write(pickle.MARK)
            save(obj.callable)
            for a in obj.args:
                save(a)
            write(pickle.OBJ)
        else:
            save(obj.callable)
            save(obj.args)
            if obj.opcode == "newobj_ex":
                save(obj.kwargs)
            write({"reduce": pickle.REDUCE, "newobj": pickle.NEWOBJ, "newobj_ex": pickle.NEWOBJ_EX}[obj.opcode])
        self.memoize(obj)
        i = 0
        while i < len(obj.ops):
            op = obj.ops[i][0]
            j = i
            while j < len(obj.ops) and obj.ops[j][0] == op and op != "build":
                j += 1
            if op == "build":
                save(obj.ops[i][1])
                write(pickle.BUILD)
                i += 1
                continue
            run = obj.ops[i:j]
            write(pickle.MARK)
            for _, v in run:
                if op == "append":
                    save(v)
                else:
                    save(v[0])
                    save(v[1])
            write(pickle.APPENDS if op == "append" else pickle.SETITEMS)
            i = j

    dispatch[PickledObject] = save_pickled_object


def _dump(obj: Any, file: Any, protocol: int | None = None, **kwargs: Any) -> None:
    _SafePickler(file, protocol, **kwargs).dump(obj)


_WRITER = types.SimpleNamespace(__name__=__name__, Pickler=_SafePickler, dump=_dump)


def _children(o: Any) -> Iterator[Any]:
    if isinstance(o, Mapping):
        for k, v in o.items():
            yield k
            yield v
    elif isinstance(o, (list, tuple, set, frozenset)):
        yield from o
    elif isinstance(o, PickledObject):
        yield o.callable
        yield o.args
        if o.kwargs is not None:
            yield o.kwargs
        for _, v in o.ops:
            yield v


def walk(obj: Any) -> Iterator[Any]:
    """Every object reachable through containers and placeholders, each once, depth-first."""
    seen: set[int] = set()
    stack = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        yield o
        if depth < MAX_DEPTH:
            stack.extend((c, depth + 1) for c in _children(o) if not isinstance(c, (str, bytes, int, float)))


def first_placeholder(obj: Any) -> tuple[tuple[Any, ...], PickledGlobal | PickledObject] | None:
    """The key path to the first placeholder inside dicts / lists / tuples, if any (each object once)."""
    seen: set[int] = set()
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, ())]
    while stack:
        o, path = stack.pop()
        if isinstance(o, _PLACEHOLDERS):
            return path, o
        if id(o) in seen or len(path) > MAX_DEPTH:
            continue
        seen.add(id(o))
        if isinstance(o, Mapping):
            stack.extend((v, (*path, k)) for k, v in reversed(list(o.items())))
        elif isinstance(o, (list, tuple)):
            stack.extend((v, (*path, i)) for i, v in reversed(list(enumerate(o))))
    return None


def has_placeholders(obj: Any) -> bool:
    return any(isinstance(o, _PLACEHOLDERS) for o in walk(obj))


def pickle_module_for(obj: Any) -> Any:
    """The ``pickle_module`` to save ``obj`` with: ``pickle`` itself, or, when ``obj`` holds
    placeholders, a pickler that writes them back as they were read.

    A whole pickled model object is not rewritten from its placeholder: its parameters are what
    the edit is about, and only its real class knows how they fit together."""
    found = False
    for o in walk(obj):
        if isinstance(o, PickledObject) and is_module_object(o):
            from ..errors import WriteError

            module = o.type_name.rpartition(".")[0]
            raise WriteError(f"the checkpoint holds a whole pickled model object ({o.type_name}): optckpt reads it "
                             f"without running it, but rewrites it only with --trust-pickle (which imports {module} "
                             "and runs the file's unpickling code; only for files you trust)")
        found = found or isinstance(o, _PLACEHOLDERS)
    return _WRITER if found else pickle


# ---------------------------------------------------------------------------------------------
# looking inside


def fields_of(obj: Any) -> dict[str, Any] | None:
    """An object's attributes, when its ``BUILD`` state is the usual ``__dict__`` (plus slots)."""
    if not isinstance(obj, PickledObject):
        return None
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], Mapping)) \
            and isinstance(state[1], Mapping):
        merged = {**(state[0] or {}), **state[1]}
        return {str(k): v for k, v in merged.items()}
    if isinstance(state, Mapping) and all(isinstance(k, str) for k in state):
        return dict(state)
    return None


def is_module_object(obj: Any) -> bool:
    """A pickled ``nn.Module`` (``torch.save(model)``): its ``__dict__`` has the module registries."""
    f = fields_of(obj)
    return f is not None and all(isinstance(f.get(k), Mapping) for k in ("_parameters", "_buffers", "_modules"))


def module_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """A pickled module's ``state_dict()`` contents by attribute path (``model.0.conv.weight``), in
    ``state_dict`` order; a submodule shared by several parents is listed once, under its first path."""
    out: dict[str, torch.Tensor] = {}
    _module_walk(obj, "", 0, out, set())
    return out


def _module_walk(m: Any, prefix: str, depth: int, out: dict[str, Any], seen: set[int]) -> None:
    """:func:`module_tensors` below the module ``m`` (a module-level function: a recursive closure
    refers to itself, a cycle that keeps what it found alive until a cyclic collection)."""
    if id(m) in seen or depth > MAX_DEPTH:
        return
    seen.add(id(m))
    f = fields_of(m) or {}
    for k, v in f["_parameters"].items():
        if is_tensor(v):
            out[prefix + str(k)] = v
    skip = f.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, (set, frozenset)) else set()
    for k, v in f["_buffers"].items():
        if is_tensor(v) and k not in skip:
            out[prefix + str(k)] = v
    for k, sub in f["_modules"].items():
        if is_module_object(sub):
            _module_walk(sub, f"{prefix}{k}.", depth + 1, out, seen)


def describe(v: Any, budget: int = 160) -> str:
    """A short, bounded text for a value that may hold placeholders (never longer than ``budget``)."""
    text = _describe(v, 0)
    return text if len(text) <= budget else text[: budget - 3] + "..."


def _describe(v: Any, depth: int) -> str:
    if isinstance(v, PickledGlobal):
        return v.name
    if isinstance(v, PickledObject):
        if v.is_call:
            if depth > 2 or not isinstance(v.args, tuple):
                return f"{v.type_name}(...)"
            return f"{v.type_name}(" + ", ".join(_describe(a, depth + 1) for a in v.args[:4]) + \
                (", ..." if len(v.args) > 4 else "") + ")"
        f = fields_of(v)
        return f"<{v.type_name} object" + (f", {len(f)} fields>" if f is not None else ">")
    if is_tensor(v):
        return f"tensor{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, (str, bytes)):
        return repr(v[:60]) + ("..." if len(v) > 60 else "")
    if isinstance(v, (bool, int, float)) or v is None:
        return repr(v)
    if isinstance(v, Mapping):
        return f"dict ({len(v)} keys)"
    if isinstance(v, (list, tuple)):
        if depth > 2:
            return f"{type(v).__name__} ({len(v)} items)"
        inner = ", ".join(_describe(x, depth + 1) for x in v[:4]) + (", ..." if len(v) > 4 else "")
        return f"[{inner}]" if isinstance(v, list) else f"({inner})"
    shape = getattr(v, "shape", None)
    if type(v).__module__ == "numpy" and isinstance(shape, tuple):
        return f"numpy{shape} {getattr(v, 'dtype', '')}" if shape else repr(v)
    return type(v).__name__


def same(a: Any, b: Any) -> bool:
    """Structural equality through containers and placeholders; tensors and arrays bit for bit.

    Each pair of objects is compared once (shared references and cycles cost nothing extra)."""
    done: set[tuple[int, int]] = set()
    stack = [(a, b, 0)]
    while stack:
        x, y, depth = stack.pop()
        if x is y or (id(x), id(y)) in done:
            continue
        done.add((id(x), id(y)))
        if depth > MAX_DEPTH:
            return False
        if isinstance(x, PickledObject) or isinstance(y, PickledObject):
            if not (isinstance(x, PickledObject) and isinstance(y, PickledObject)) or x.opcode != y.opcode \
                    or [op for op, _ in x.ops] != [op for op, _ in y.ops]:
                return False
            stack.extend((p, q, depth + 1) for p, q in zip(
                (x.callable, x.args, x.kwargs, *(v for _, v in x.ops)),
                (y.callable, y.args, y.kwargs, *(v for _, v in y.ops))))
        elif is_tensor(x) or is_tensor(y):
            if not (is_tensor(x) and is_tensor(y)) or not _same_tensor(x, y):
                return False
        elif isinstance(x, Mapping) and isinstance(y, Mapping):
            if type(x) is not type(y) or list(x.keys()) != list(y.keys()):
                return False
            stack.extend((x[k], y[k], depth + 1) for k in x)
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if type(x) is not type(y) or len(x) != len(y):
                return False
            stack.extend((p, q, depth + 1) for p, q in zip(x, y))
        elif isinstance(x, float) and isinstance(y, float):
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                return False
        elif hasattr(x, "tobytes") and hasattr(y, "tobytes") and hasattr(x, "dtype"):  # numpy arrays / scalars
            if type(x) is not type(y) or x.dtype != y.dtype or getattr(x, "shape", None) != getattr(y, "shape", None) \
                    or x.tobytes() != y.tobytes():
                return False
        else:
            try:
                if not bool(x == y):
                    return False
            except Exception:
                return False
    return True


def _same_tensor(a: Any, b: Any) -> bool:
    import torch

    from ..tensors import materialize

    a, b = materialize(a), materialize(b)
    if a.shape != b.shape or a.dtype != b.dtype or type(a) is not type(b):
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                            b.detach().contiguous().reshape(-1).view(torch.uint8)))
