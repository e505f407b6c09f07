"""Record-level rewrite of a torch zip checkpoint: a new pickle, the storage records copied.

A remap / reset / set only relabels storages or edits small values: no tensor byte changes. So
instead of ``torch.save`` re-serialising every storage (and computing each record's CRC), the new
object is pickled by torch's own ``_save`` into a recorder, every storage that is a memory-mapped
record of the input is copied byte for byte from the input file (``os.copy_file_range``: in the
kernel, no trip through user space) with the input's CRC, and only the pickle and genuinely new
storages are written from memory. The result is an ordinary zip that ``torch.load`` reads with
``weights_only=True, mmap=True`` (same record names, 64-byte data alignment, zip64 when needed).

:func:`rewrite_records` returns False when the shortcut does not apply (legacy format, compressed
records, the input not mapped); the caller then uses ``torch.save``."""

from __future__ import annotations

import ctypes
import operator
import os
import queue
import random
import struct
import sys
import threading
import zlib
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from ..tensors import RecordTensor, has_record_tensors, materialize
from .lazypickle import Unpicklable, dump
from .readguard import file_mappings, offset_in
from .safepickle import pickle_module_for
from .zipscan import ZipEntry

__all__ = ["rewrite_records", "PROGRESS"]

PROGRESS: ContextVar[Callable[[int], None] | None] = ContextVar("optckpt_write_progress", default=None)
"""Where the writers report bytes written / verified (the CLI's progress bar); None: nobody asks."""

_ALIGN = 64
_SMALL_RECORDS = ("version", ".format_version", ".storage_alignment", "byteorder")
_Z64 = 0xFFFFFFFF  # the "see the zip64 extra field" placeholder
_Z64_LIMIT = 0xFFFFFFFF  # sizes / offsets from here on need zip64 (a test lowers it)


class _Recorder:
    """Stands in for ``PyTorchFileWriter``: remembers what torch's ``_save`` would write."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Any, int]] = []

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        self.records.append((name, data, nbytes))

    def write_record_metadata(self, name: str, nbytes: int) -> None:  # skip_data mode: not used here
        raise RuntimeError("skip_data is not supported by the record rewriter")


def _source_records(path: str) -> tuple[str, dict[int, ZipEntry], dict[str, bytes]] | None:
    """Prefix, data records by their data offset, and the small metadata records of the input."""
    from .torchfile import zip_infos

    infos = zip_infos(path)
    if not infos or any(i.compress_type != 0 for i in infos):
        return None
    prefix = infos[0].filename.split("/", 1)[0]
    by_offset: dict[int, ZipEntry] = {}
    small: dict[str, bytes] = {}
    with open(path, "rb") as f:
        for i in infos:
            data_rec = "/data/" in i.filename and not i.filename.endswith("serialization_id")
            if not data_rec and i.filename.rsplit("/", 1)[-1] not in _SMALL_RECORDS:
                continue
            at = i.data_offset  # (the parse checked each local header against its central entry)
            if data_rec:
                by_offset[at] = i
                continue
            f.seek(at)
            data = f.read(i.file_size)
            if len(data) != i.file_size or zlib.crc32(data) != i.CRC:
                return None
            small[i.filename[len(prefix) + 1:]] = data
    return prefix, by_offset, small


def rewrite_records(src: str, obj: Any, dest: str) -> bool:
    """Write ``obj`` (whose tensors are mostly memory-mapped from ``src``) to ``dest`` record by record.

    Returns False (nothing written) when the shortcut does not apply."""
    from ..errors import LoadError

    try:
        found = _source_records(src)
    except LoadError:
        return False
    if found is None:
        return False
    prefix, by_offset, small = found
    if has_record_tensors([obj]):  # read lazily: pickled by optckpt's own pickler when it can
        written = _rewrite_lazy(src, obj, dest, prefix, by_offset, small)
        if written:
            return True
        obj = materialize(obj)  # something only torch writes: the tensors become real ones
    import torch

    rec = _Recorder()
    torch.serialization._save(obj, rec, pickle_module_for(obj), torch.serialization.DEFAULT_PROTOCOL, False)
    ranges = file_mappings(src) if any(n.startswith("data/") for n, _, _ in rec.records) else [(0, 0)]
    if not ranges:
        return False
    entries: list[tuple[str, Any]] = []  # (name, bytes | (src_offset, ZipInfo) | storage)
    for name, data, nbytes in rec.records:
        if name.startswith("data/"):
            storage = data
            off = offset_in(ranges, storage.data_ptr()) if nbytes else None
            info = by_offset.get(off) if off is not None else None
            if info is not None and info.file_size == nbytes:
                entries.append((name, (off, info)))
            else:
                entries.append((name, storage))
        else:
            entries.append((name, data.encode() if isinstance(data, str) else bytes(data)))
    entries.append(("version", small.get("version", b"3\n")))
    entries.append((".data/serialization_id", "".join(random.choice("0123456789") for _ in range(40)).encode()))
    _write_zip(src, dest, prefix, entries)
    return True


def pickle_lazily(src: str, obj: Any, by_offset: dict[int, ZipEntry], prefix: str,
                  found: dict[str, ZipEntry] | None = None) -> tuple[bytes, list[str]] | None:
    """``obj`` as ``data.pkl`` by optckpt's own pickler (:func:`optckpt.io.lazypickle.dump`) when every
    tensor in it is a lazily read record of ``src`` (the record exactly as checked: same data offset,
    size and key, which it keeps), with the keys it references; None when it holds anything else (the
    caller writes through torch). ``found``: filled with each referenced key's record in ``src``."""
    same: dict[int, bool] = {}
    data_prefix = f"{prefix}/data/"
    if found is None:
        found = {}

    def key_of(t: RecordTensor) -> str:
        ok = same.get(id(t.source))
        if ok is None:
            try:
                ok = os.path.samefile(t.source.path, src)
            except OSError:
                ok = False
            same[id(t.source)] = ok
        info = by_offset.get(t.data_offset) if ok else None
        if info is None or info.file_size != t.storage_nbytes or info.filename != data_prefix + t.key:
            raise Unpicklable(f"a tensor from {t.source.path} record {t.key!r}, not a record of {src}")
        found[t.key] = info
        return t.key

    try:
        return dump(obj, key_of)
    except Unpicklable:
        return None


def record_order(keys: Any) -> list[str]:
    """Storage keys in the order torch writes their records: numeric keys (ASCII digits) by value, equal
    values as strings ("07" before "7"), then the others as strings. (Two C-level sorts of the numeric
    keys: a sort keyed by a Python function costs 3 s at 600k keys.)"""
    keys = list(keys)
    numeric = [k for k in keys if k.isascii() and k.isdigit()]
    rest = [] if len(numeric) == len(keys) else sorted(k for k in keys if not (k.isascii() and k.isdigit()))
    numeric.sort()
    numeric.sort(key=int)  # (stable: equal values stay in string order)
    return numeric + rest


_DATA_OFFSET = operator.attrgetter("data_offset")  # (of a ZipEntry)
_KEY, _OFFSET_AND_ENTRY = operator.itemgetter(1), operator.itemgetter(0, 2)  # of (data offset, key, ZipEntry)


def _rewrite_lazy(src: str, obj: Any, dest: str, prefix: str, by_offset: dict[int, ZipEntry],
                  small: dict[str, bytes]) -> bool:
    """``obj`` (tensors read lazily from ``src``) written by optckpt's own pickler, every record it
    references copied from ``src`` as it is (same key, same CRC). False when it holds anything else."""
    found: dict[str, ZipEntry] = {}
    done = pickle_lazily(src, obj, by_offset, prefix, found)
    if done is None:
        return False
    pickled, keys = done
    entries: list[tuple[str, Any]] = [("data.pkl", pickled)]
    entries += [(r, small[r]) for r in (".format_version", ".storage_alignment", "byteorder") if r in small]
    # the records in the order they lie in the source (torch's: by key), so that neighbours are copied in one piece
    # (by C-level passes: data offsets are distinct, so the sort compares them only)
    ordered = sorted(zip(map(_DATA_OFFSET, found.values()), found.keys(), found.values()))
    entries += zip(map("data/".__add__, map(_KEY, ordered)), map(_OFFSET_AND_ENTRY, ordered))
    entries.append(("version", small.get("version", b"3\n")))
    entries.append((".data/serialization_id", "".join(random.choice("0123456789") for _ in range(40)).encode()))
    _write_zip(src, dest, prefix, entries)
    return True


def _storage_bytes(storage: Any, nbytes: int) -> bytes:
    """A CPU storage's bytes (without numpy, which optckpt does not depend on)."""
    return ctypes.string_at(storage.data_ptr(), nbytes) if nbytes else b""


_KICK = 32 << 20  # start the writeback of what was written every this many bytes
_SYNC_FILE_RANGE: Any = None


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or False where there is none."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        _SYNC_FILE_RANGE = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                _SYNC_FILE_RANGE = fn
            except (OSError, AttributeError):
                pass
    return _SYNC_FILE_RANGE


class _Writeback:
    """Starts the kernel writing a file back to disk as it is written, every :data:`_KICK` bytes
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: asynchronous, it waits for nothing), so that the
    disk works while the copy goes on and the final fsync has little left to wait for (instead of
    the whole file's writeback starting only at the fsync). Issued from a thread of its own (it
    allocates blocks and submits the I/O, which may wait for the device's queue) on a duplicate of
    the descriptor, so the copy never waits for it. Only a hint: the fsync still decides."""

    def __init__(self, fd: int) -> None:
        self.done = 0
        self._queue: queue.SimpleQueue[int | None] | None = None
        fn = _sync_file_range()
        if fn:
            dup = os.dup(fd)
            self._queue = queue.SimpleQueue()
            try:
                threading.Thread(target=self._run, args=(fn, dup, self._queue), name="optckpt-writeback",
                                 daemon=True).start()
            except BaseException:
                os.close(dup)
                self._queue = None
                raise

    @staticmethod
    def _run(fn: Any, fd: int, todo: queue.SimpleQueue[int | None]) -> None:
        start = 0
        try:
            while (upto := todo.get()) is not None:
                fn(fd, start, upto - start, 2)  # SYNC_FILE_RANGE_WRITE (errors: the fsync's to report)
                start = upto
        finally:
            os.close(fd)

    def written(self, upto: int, *, last: bool = False) -> None:
        if self._queue is not None and (upto - self.done >= _KICK or (last and upto > self.done)):
            self._queue.put(upto)
            self.done = upto

    def close(self) -> None:
        """No more kicks: the thread ends once the queued ones are issued (not waited for)."""
        if self._queue is not None:
            self._queue.put(None)
            self._queue = None


def _open_new(dest: str) -> Any:
    """``dest`` (a new, empty temp file) opened for writing without ``O_TRUNC``: on ext4, truncating
    a file to zero makes its ``close`` start writing the whole file back and wait for that (the
    "replace by truncate" safeguard), which the fsync that follows does anyway."""
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        return open(fd, "r+b")
    except BaseException:
        os.close(fd)
        raise


def _write_zip(src: str, dest: str, prefix: str, entries: list[tuple[str, Any]]) -> None:
    central: list[bytes] = []
    tick = PROGRESS.get()
    with open(src, "rb") as fin, _open_new(dest) as fout:
        src_fd, dst_fd = fin.fileno(), fout.fileno()
        writeback = _Writeback(dst_fd)
        try:
            _write_entries(entries, prefix, fout, src_fd, writeback, central, tick)
        finally:
            writeback.close()


def _write_entries(entries: list[tuple[str, Any]], prefix: str, fout: Any, src_fd: int, writeback: _Writeback,
                   central: list[bytes], tick: Any) -> None:
    dst_fd = fout.fileno()
    runs = _runs(entries, prefix)
    k = 0
    while k < len(entries):
        rel, data = entries[k]
        name = f"{prefix}/{rel}".encode()
        stop = runs.get(k, 0)
        if stop:
            offset = fout.tell()
            if _copy_run(entries[k:stop], fout, src_fd, writeback, central, tick):
                k = stop
                continue
            fout.seek(offset)
        k += 1
        if isinstance(data, tuple):
            src_off, info = data
            size, crc = info.file_size, info.CRC
            payload = None
        else:
            payload = data if isinstance(data, bytes) else _storage_bytes(data, data.nbytes())
            size, crc = len(payload), zlib.crc32(payload)
        offset = fout.tell()
        fout.write(local_header(name, size, crc, offset))
        if payload is not None:
            fout.write(payload)
        else:
            fout.flush()
            _copy_range(src_fd, dst_fd, src_off, fout.tell(), size)
            fout.seek(fout.tell() + size)
            writeback.written(fout.tell())
        if tick is not None:
            tick(size)
        central.append(central_entry(name, size, crc, offset))
    cd_start = fout.tell()
    for c in central:
        fout.write(c)
    cd_size = fout.tell() - cd_start
    n = len(central)
    if cd_start >= _Z64_LIMIT or n >= 0xFFFF or cd_size >= _Z64_LIMIT:
        z64_eocd = fout.tell()
        fout.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
        fout.write(struct.pack("<IIQI", 0x07064B50, 0, z64_eocd, 1))
        fout.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _Z64, _Z64, 0))
    else:
        fout.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_start, 0))
    fout.flush()
    writeback.written(fout.tell(), last=True)


def local_header(name: bytes, size: int, crc: int, offset: int, *, descriptor: bool = False) -> bytes:
    """The local header of a stored record whose header starts at ``offset``, padded (an "FB" extra
    field, as torch writes it) so that the data after it starts on a 64-byte boundary.
    ``descriptor``: the data is followed by a data descriptor (flag bit 3; the header still gives
    the CRC and sizes, which the descriptor repeats)."""
    z64 = size >= _Z64_LIMIT or offset >= _Z64_LIMIT
    z64_local = struct.pack("<HHQQ", 0x0001, 16, size, size) if z64 else b""
    fixed = 30 + len(name) + len(z64_local)
    pad = (-(offset + fixed + 4)) % _ALIGN
    extra = z64_local + struct.pack("<HH", 0x4246, pad) + b"\0" * pad
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if z64 else 20, 0x0808 if descriptor else 0x0800, 0, 0,
                       0x21, crc, _Z64 if z64 else size, _Z64 if z64 else size, len(name), len(extra)) + name + extra


def _runs(entries: list[tuple[str, Any]], prefix: str) -> dict[int, int]:
    """Runs of at least two copied records that lie one right after the other in the source, under
    the same names (index of the first -> index after the last): :func:`_copy_run` copies each run
    in one piece. Only below the zip64 limits (a record's data descriptor is 16 bytes there)."""
    runs: dict[int, int] = {}
    k = 0
    while k < len(entries):
        j = k
        while j < len(entries) and _plain_copy(entries[j], prefix) and \
                (j == k or entries[j][1][1].header_offset == entries[j - 1][1][1].end):
            j += 1
        if j - k >= 2:
            runs[k] = j
        k = max(j, k + 1)
    return runs


def _plain_copy(entry: tuple[str, Any], prefix: str) -> bool:
    rel, data = entry
    if not isinstance(data, tuple):
        return False
    info = data[1]
    tail = info.end - info.data_offset - info.file_size  # its data descriptor: none, or 16 bytes
    return (info.filename == f"{prefix}/{rel}" and tail in (0, 16) and info.end < _Z64_LIMIT
            and info.file_size < _Z64_LIMIT and info.flag_bits & ~0x08 == 0x0800)  # (the flags we list it with)


def _copy_run(run: list[tuple[str, Any]], fout: Any, src_fd: int, writeback: _Writeback, central: list[bytes],
              tick: Any) -> bool:
    """Copy records that follow one another in the source (:func:`_runs`) in one piece: the first
    one's local header written anew (its data 64-byte aligned), then everything from its data to the
    end of the last one copied as it is (data, data descriptors, the others' local headers), which
    keeps every record's data aligned (the source's are, and the shift is a multiple of 64). False
    (nothing written) where the result would pass the zip64 limits."""
    first = run[0][1][1]
    last = run[-1][1][1]
    head_at = fout.tell()
    head = local_header(first.filename.encode(), first.file_size, first.CRC, head_at,
                        descriptor=first.end > first.data_offset + first.file_size)
    data_at = head_at + len(head)
    shift = data_at - first.data_offset
    if shift % _ALIGN or last.end + shift >= _Z64_LIMIT:
        return False
    fout.write(head)
    fout.flush()
    dst_fd = fout.fileno()
    done, total = 0, last.end - first.data_offset
    while done < total:  # in pieces, each one's writeback started as the next is copied
        n = min(_KICK, total - done)
        _copy_range(src_fd, dst_fd, first.data_offset + done, data_at + done, n)
        done += n
        writeback.written(data_at + done)
    fout.seek(data_at + total)
    for i, (_, (_, info)) in enumerate(run):
        at = head_at if i == 0 else info.header_offset + shift
        central.append(central_entry(info.filename.encode(), info.file_size, info.CRC, at))
        if tick is not None:
            tick(info.file_size)
    return True


_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")


def central_entry(name: bytes, size: int, crc: int, offset: int, flags: int = 0x0800) -> bytes:
    """The central-directory entry of a stored record whose local header is at ``offset``. ``flags``: its
    general-purpose bits (optckpt's records: UTF-8 names; a record listed again where it lies: its own)."""
    if size < _Z64_LIMIT and offset < _Z64_LIMIT:  # (the common case, once per record: one precompiled pack)
        return _CENTRAL.pack(0x02014B50, 20, 20, flags, 0, 0, 0x21, crc, size, size, len(name), 0, 0, 0, 0, 0,
                             offset) + name
    z64_central = struct.pack("<HHQQQ", 0x0001, 24, size, size, offset)  # zip64: the real values in an extra field
    return _CENTRAL.pack(0x02014B50, 45, 45, flags, 0, 0, 0x21, crc, _Z64, _Z64, len(name), len(z64_central),
                         0, 0, 0, 0, _Z64) + name + z64_central


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, size: int) -> None:
    """Copy ``size`` bytes between files in the kernel (copy_file_range), or by reads where not offered."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range") and sys.platform.startswith("linux")
    while done < size:
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, size - done, src_off + done, dst_off + done)
            except OSError as e:
                if e.errno in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: fall back to reads
                    use_kernel = False
                    continue
                raise
        else:
            chunk = os.pread(src_fd, min(size - done, 1 << 24), src_off + done)
            n = os.pwrite(dst_fd, chunk, dst_off + done) if chunk else 0
        if n <= 0:
            raise OSError(5, "Input/output error: short copy")
        done += n
