"""Verification of what an edit wrote: one mechanism for "same bytes" (:func:`bit_equal` per tensor,
:func:`all_bit_equal` over many on every core, :func:`same_bits` through containers), serving the
writers' read-back checks (early exit on the first difference) and ``diff``'s per-tensor entries."""

from __future__ import annotations

import ctypes
import operator
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import compress
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint
from .errors import LoadError, WriteError
from .io import load
from .io.records import PROGRESS
from .tensors import RecordTensor, has_record_tensors, is_tensor, is_torch_module, materialize

if TYPE_CHECKING:
    import torch

__all__ = ["bit_equal", "all_bit_equal", "same_bits", "verify_output", "verify_converted"]


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    import torch

    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.element_size() != 1 or flat.dtype != torch.uint8 else flat


_MEMCMP: Any = None


def _memcmp() -> Any:
    """libc's ``memcmp`` (ctypes releases the GIL around it), or False where there is none."""
    global _MEMCMP
    if _MEMCMP is None:
        try:
            fn = ctypes.CDLL(None).memcmp
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            _MEMCMP = fn
        except (OSError, AttributeError):
            _MEMCMP = False
    return _MEMCMP


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaN payloads included).

    Dense contiguous CPU tensors (every record of a checkpoint read with ``mmap``) are compared by
    libc ``memcmp``: one thread at memory bandwidth, independent of alignment. ``torch.equal`` spreads
    the same pass over torch's intra-op threads, which on a machine whose cores are busy elsewhere
    runs several times slower than one thread. Other tensors are compared as the widest integer
    words that both addresses allow (chosen for the pair, so equal tensors at differently aligned
    addresses, records inside a safetensors file, still compare equal)."""
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    if type(a) is RecordTensor or type(b) is RecordTensor:  # read lazily: the bytes in the files' mappings
        va = a.contiguous_bytes() if type(a) is RecordTensor else None
        vb = b.contiguous_bytes() if type(b) is RecordTensor else None
        if va is not None and vb is not None:
            return _same_buffers(va, vb)
        a, b = materialize(a), materialize(b)
    import torch

    cmp = _memcmp()
    if (cmp and a.device.type == "cpu" and b.device.type == "cpu" and a.layout == torch.strided
            and b.layout == torch.strided and a.is_contiguous() and b.is_contiguous()
            and not (a.is_conj() or b.is_conj() or a.is_neg() or b.is_neg())):
        return a.data_ptr() == b.data_ptr() or cmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    ra, rb = _raw_bytes(a), _raw_bytes(b)
    n = ra.numel()
    for dt, w in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if n % w == 0 and ra.data_ptr() % w == 0 and rb.data_ptr() % w == 0:
            return bool(torch.equal(ra.view(dt), rb.view(dt)))
    return bool(torch.equal(ra, rb))


def all_bit_equal(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  done: Callable[[torch.Tensor], None] | None = None) -> bool:
    """:func:`bit_equal` of every pair, spread over the cores in batches of similar byte counts
    (``memcmp`` runs without the GIL; a task per tiny tensor would cost more than comparing it).
    ``done`` is called, in this thread, with each pair's first tensor once compared."""
    total = sum(x.numel() * x.element_size() for x, _ in pairs)
    workers = min(os.cpu_count() or 1, 8)
    if workers <= 1 or total < (16 << 20) or len(pairs) < 2:
        for x, y in pairs:
            if not bit_equal(x, y):
                return False
            if done is not None:
                done(x)
        return True
    batches: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
    size, per_batch = 0, max(total // (4 * workers), 1)
    for pair in pairs:
        if size >= per_batch:
            batches.append([])
            size = 0
        batches[-1].append(pair)
        size += pair[0].numel() * pair[0].element_size()
    with ThreadPoolExecutor(workers) as pool:
        for batch, equal in zip(batches, pool.map(lambda bt: all(bit_equal(x, y) for x, y in bt), batches)):
            if not equal:
                pool.shutdown(wait=False, cancel_futures=True)
                return False
            if done is not None:
                for x, _ in batch:
                    done(x)
    return True


def same_bits(a: Any, b: Any, same_record: Callable[[torch.Tensor, torch.Tensor], bool] | None = None) -> bool:
    """Bit-for-bit equality of tensors (NaN == NaN), recursively through containers: the structure
    first, then the tensors' bytes on every core (:func:`all_bit_equal`). The bytes of
    each tensor compared go to the writers' progress hook, when one is set. ``same_record``: says
    of two tensors that they are provably the same bytes without reading them (else compared)."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    if not _same_structure(a, b, same_record, pairs):
        return False
    tick = PROGRESS.get()
    return all_bit_equal(pairs, None if tick is None else lambda x: tick(x.numel() * x.element_size()))


def _same_structure(a: Any, b: Any, same_record: Callable[[torch.Tensor, torch.Tensor], bool] | None,
                    pairs: list[tuple[torch.Tensor, torch.Tensor]], depth: int = 0) -> bool:
    """Equal containers and values, tensors aside: those go to ``pairs`` (unless ``same_record``
    proves them), to be compared byte for byte. Modules compare by class and state dict."""
    if depth > 256:
        return False  # (a cycle through objects' attributes)
    if is_tensor(a) or is_tensor(b):
        if not (is_tensor(a) and is_tensor(b)):
            return False
        if type(a) is RecordTensor or type(b) is RecordTensor:  # compared by value: read both
            a, b = materialize(a), materialize(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if same_record is None or not same_record(a, b):
            pairs.append((a, b))
        return True
    if is_torch_module(a) or is_torch_module(b):
        # a whole pickled module (--trust-pickle): the same class, and its state by name, in order, bit for bit
        return type(a) is type(b) and _same_structure(a.state_dict(keep_vars=False), b.state_dict(keep_vars=False),
                                                      same_record, pairs)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a.keys()) == list(b.keys()) and \
            all(_same_structure(a[k], b[k], same_record, pairs, depth + 1) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_structure(x, y, same_record, pairs, depth + 1) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if type(a) is type(b) and isinstance(a, deque):  # AdaShift's past gradients (--trust-pickle: real ones)
        return len(a) == len(b) and all(_same_structure(x, y, same_record, pairs, depth + 1) for x, y in zip(a, b))
    if type(a) is type(b) and type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__") and hasattr(b, "__dict__"):
        # an object built with --trust-pickle (GaLore's projector): the same when it holds the same
        # (identity is all its own == compares, and a re-read is always another object)
        return _same_structure(vars(a), vars(b), same_record, pairs, depth + 1)
    try:
        return bool(a == b)
    except Exception:  # an == that does not give one truth value (arrays, tensors inside objects)
        return False


def _same_record_in(path: str) -> Callable[[torch.Tensor, torch.Tensor], bool]:
    """For a file edited by appending (its old bytes never written): two tensors memory-mapped from
    ``path`` at the same file offset, with the same dtype, shape, strides and storage size, hold the
    same bytes, whichever version's mapping each came from."""
    from .io.readguard import file_mappings, offset_in

    ranges = file_mappings(path)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        sa, sb = a.untyped_storage(), b.untyped_storage()
        if a.device.type != "cpu" or b.device.type != "cpu" or sa.nbytes() != sb.nbytes() or sa.nbytes() == 0:
            return False
        oa, ob = offset_in(ranges, sa.data_ptr()), offset_in(ranges, sb.data_ptr())
        return (oa is not None and oa == ob and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and a.storage_offset() == b.storage_offset())

    return same


def verify_output(ck: Checkpoint, out: str, changed_parts: Mapping[str, Any], *, trust_pickle: bool = False,
                  with_torch: bool = False) -> None:
    """Re-read what was written: every rewritten file must hold exactly the intended object (each
    tensor bit for bit: unchanged ones identical to the input, moved ones equal to their source;
    in a file edited by appending, a tensor still at its old record's offset is that record),
    and every file copied from a directory checkpoint must have its original size."""
    from .io.torchfile import load_torch_file

    single = not os.path.isdir(out)
    kinds = {p.relpath: p.kind for p in ck.parts}
    for relpath, intended in changed_parts.items():
        path = out if single else os.path.join(out, relpath)
        if kinds.get(relpath) == "safetensors":
            _verify_safetensors(path, intended)
            continue
        appended = single and os.path.isfile(ck.path) and os.path.samefile(path, ck.path)
        try:
            if not with_torch and has_record_tensors([intended], only=True) and \
                    _verify_lazy(path, intended, appended):
                continue
            got = _torch_read_back(path) if with_torch else None
            if got is None:
                got = load_torch_file(path, trust_pickle=trust_pickle, quiet=True).obj
        except (LoadError, RuntimeError) as e:  # (RuntimeError: torch's reader, --verify torch)
            why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise WriteError(f"{path}: verification failed: the written file does not read back ({why}) "
                             "(nothing was written; the input is untouched)") from None
        if not same_bits(got, intended, _same_record_in(path) if appended else None):
            raise WriteError(f"{path}: verification failed: the written file differs from what was meant "
                             "(nothing was written; the input is untouched)")
    if not single:
        for p in ck.parts:
            if p.relpath in changed_parts:
                continue
            dst = os.path.join(out, p.relpath)
            if not os.path.isfile(dst) or os.path.getsize(dst) != p.nbytes:
                raise WriteError(f"{dst}: verification failed: copied file is missing or has another size")


def _torch_read_back(path: str) -> Any:
    """``--verify-torch``: the written file as ``torch.load(weights_only=True)`` reads it (None for a
    file that holds pickled objects, which only optckpt's placeholder reader reads back safely)."""
    import pickle

    import torch

    from .io.safepickle import torch_table_bounded

    try:
        with torch_table_bounded():
            return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError:
        return None


_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_AT, _NBYTES, _SOURCE = (operator.attrgetter(a) for a in ("data_offset", "storage_nbytes", "source"))


def _verify_lazy(path: str, intended: Any, appended: bool) -> bool:
    """Verify a file written by optckpt's own pickler without torch: the new pickle read back by the
    lazy reader is the intended object (structure, values, every tensor's record key, dtype, shape,
    stride, offset), and every record it references holds the bytes of the record it was copied from
    (``memcmp`` of the two files' mappings; in a file edited by appending, a record left where it was
    is that record). False when that does not prove it (a file torch's pickler wrote, or a
    difference): the caller then verifies it bit for bit, which decides and names any difference."""
    from .gcpause import gc_paused
    from .io.lazypickle import same_structure
    from .io.torchfile import load_torch_file

    with gc_paused():  # (a re-read beside the object written: collections would walk both, repeatedly)
        got = load_torch_file(path, quiet=True, lazy=True).obj
    if not has_record_tensors([got]):
        return False
    pairs: dict[str, tuple[RecordTensor, RecordTensor]] = {}  # once per distinct record
    if same_structure(intended, got, lambda t: t.key, pairs=pairs) is not None:
        return False  # not what our pickler writes (torch's renumbers records): the bit-for-bit check decides
    tick = PROGRESS.get()
    written, read = list(map(_FIRST, pairs.values())), list(map(_SECOND, pairs.values()))
    left = list(map(operator.eq, map(_AT, written), map(_AT, read))) if appended else []  # (records left in place)
    if any(left):
        if tick is not None:
            tick(sum(compress(map(_NBYTES, written), left)))
        keep = list(map(operator.not_, left))
        written, read = list(compress(written, keep)), list(compress(read, keep))
    return all(equal_pairs(written, read, tick))  # (False: the bit-for-bit check then names the difference)


def equal_pairs(written: Sequence[RecordTensor], read: Sequence[RecordTensor],
                tick: Callable[[int], None] | None = None) -> list[bool]:
    """For each pair ``(written[i], read[i])`` of record tensors: whether their storages are proven to
    hold the same bytes (the same size, and :func:`equal_records` over the records of each pair of
    files, in runs). By C-level passes over the pairs: a 600k-tensor file has 600k of them."""
    at_a, at_b, sizes = list(map(_AT, written)), list(map(_AT, read)), list(map(_NBYTES, written))
    out = list(map(operator.eq, sizes, map(_NBYTES, read)))  # (another size: not proven)
    files = list(zip(map(id, map(_SOURCE, written)), map(id, map(_SOURCE, read))))
    groups: dict[tuple[int, int], list[int]] = {}
    if len(set(files)) == 1:
        groups[files[0]] = list(compress(range(len(out)), out))
    else:  # (records of several files: one comparison of runs each)
        for i in compress(range(len(out)), out):
            groups.setdefault(files[i], []).append(i)
    for idx in groups.values():
        if not idx:
            continue
        keys = list(zip(map(at_a.__getitem__, idx), map(at_b.__getitem__, idx), map(sizes.__getitem__, idx)))
        equal = equal_records(written[idx[0]].source, read[idx[0]].source, sorted(set(keys)), tick)
        for i, ok in zip(idx, map(equal.__contains__, keys)):
            out[i] = ok
    return out


_RUN_RECORDS = 256  # records compared as one range of bytes at most (a range that differs: none proven)
_RUN_BYTES = 1 << 24
_RUN_GAP = 4096  # records this close (a local header, a data descriptor between) join a run


def equal_records(sa: Any, sb: Any, records: list[tuple[int, int, int]],
                  tick: Callable[[int], None] | None = None) -> set[tuple[int, int, int]]:
    """Which records ``(offset in a, offset in b, size)`` (sorted, distinct) hold the same bytes in the
    files ``sa`` and ``sb`` (:class:`~optckpt.tensors.RecordSource`): consecutive records at one
    distance (b - a), at most :data:`_RUN_GAP` bytes apart, are compared as one range of up to
    :data:`_RUN_RECORDS` records and :data:`_RUN_BYTES` bytes (a record copied in one piece with its
    neighbours, or two files written alike, costs one ``memcmp``). Small records of a range that
    differs (what lies between them may: a zip header naming another archive, a time stamp) or alone
    in theirs are compared by :func:`_equal_joined`; big ones one by one. ``memcmp`` stops at the first
    difference: files that differ everywhere cost little. ``tick``: called with each range's record bytes."""
    equal: set[tuple[int, int, int]] = set()
    small: list[tuple[int, int, int]] = []  # records left to compare by their bytes alone
    lo, n = 0, len(records)
    while lo < n:
        start, delta = records[lo][0], records[lo][1] - records[lo][0]
        end = start + records[lo][2]
        hi = lo + 1
        while hi < n and hi - lo < _RUN_RECORDS and records[hi][1] - records[hi][0] == delta:
            at, size = records[hi][0], records[hi][2]
            if at > end + _RUN_GAP or max(end, at + size) - start > _RUN_BYTES:
                break
            end = max(end, at + size)
            hi += 1
        if end == start or (hi - lo > 1 and _same_buffers(sa.view(start, end - start),
                                                           sb.view(start + delta, end - start))):
            equal.update(records[lo:hi])
        else:
            for r in records[lo:hi]:
                if r[2] <= _SMALL:
                    small.append(r)
                elif _same_buffers(sa.view(r[0], r[2]), sb.view(r[1], r[2])):
                    equal.add(r)
        if tick is not None:
            tick(sum(r[2] for r in records[lo:hi]))
        lo = hi
    equal.update(_equal_joined(sa, sb, small))
    return equal


def _equal_joined(sa: Any, sb: Any, records: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Which small records ``(offset in a, offset in b, size)`` hold the same bytes: up to
    :data:`_RUN_RECORDS` of them (and :data:`_RUN_BYTES`) at a time, their bytes joined on each side
    and compared at once (each pair is of one size, so the joined bytes are equal exactly when every
    pair is), in halves where they differ. 600k records of two files whose headers differ (another
    archive name) cost ~2,300 comparisons, not 600k."""
    if not records:
        return []
    ma, mb = sa.view(0, sa.size), sb.view(0, sb.size)
    out: list[tuple[int, int, int]] = []
    i = 0
    while i < len(records):
        j, total = i, 0
        while j < len(records) and j - i < _RUN_RECORDS and (j == i or total + records[j][2] <= _RUN_BYTES):
            total += records[j][2]
            j += 1
        todo = [records[i:j]]
        while todo:
            part = todo.pop()
            if b"".join([ma[a:a + k] for a, _, k in part]) == b"".join([mb[b:b + k] for _, b, k in part]):
                out += part
            elif len(part) > 1:
                m = len(part) // 2
                todo += (part[m:], part[:m])
        i = j
    return out


_SMALL = 1 << 16


def _same_buffers(va: memoryview, vb: memoryview) -> bool:
    """Two equally long writable byte buffers (private file mappings) hold the same bytes: ``memcmp``."""
    n = len(va)
    if n != len(vb):
        return False
    if n == 0:
        return True
    if n <= _SMALL:  # copied and compared as bytes: cheaper than a memcmp call through ctypes
        return va.tobytes() == vb.tobytes()
    cmp = _memcmp()
    if cmp:
        pa = ctypes.addressof(ctypes.c_char.from_buffer(va))
        pb = ctypes.addressof(ctypes.c_char.from_buffer(vb))
        return bool(cmp(pa, pb, n) == 0)
    return bytes(va) == bytes(vb)


def _verify_safetensors(path: str, intended: Mapping[str, torch.Tensor]) -> None:
    """A rewritten safetensors model file holds the intended tensors bit for bit (tied duplicates
    the writer left out excepted: each must be a tensor the file holds under its twin's name)."""
    from .io.safetensors_io import open_safetensors

    got, _, _ = open_safetensors(path)
    absent = [k for k in intended if k not in got]
    present = {intended[k].untyped_storage().data_ptr() for k in intended if k in got}
    if (set(got) - set(intended) or any(intended[k].untyped_storage().data_ptr() not in present for k in absent)
            or not same_bits({k: got[k] for k in sorted(got)}, {k: intended[k] for k in sorted(got)})):
        raise WriteError(f"{path}: verification failed: the written file differs from what was meant "
                         "(nothing was written; the input is untouched)")


def verify_converted(tmp: str, state: Mapping[str, Any]) -> None:
    """A converted output read back through optckpt's own loader: every model tensor bit for bit."""
    got = load(tmp)
    model = next((m for m in got.models if len(m.meta)), None)
    want = state.get("model", {})
    if model is None or set(model.meta) != set(want):
        raise WriteError(f"{tmp}: verification failed: the model tensors read back differ (nothing was written)")
    for k, t in want.items():
        if not same_bits(model.tensors[k], t):
            raise WriteError(f"{tmp}: verification failed for {k} (nothing was written)")
    torch_parts = [p for p in got.parts if p.kind == "torch" and isinstance(p.obj, Mapping)]
    if "extra" in state and torch_parts and not same_bits(torch_parts[0].obj.get("extra"), state["extra"]):
        raise WriteError(f"{tmp}: verification failed: the extra entries read back differ (nothing was written)")

