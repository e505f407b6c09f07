"""In-place edits of a torch zip checkpoint in O(pickle): append a new version, never rewrite.

A remap / set / reset changes the pickle, not the tensor bytes. So ``--in-place`` does not copy
the file: it appends to it a new ``data.pkl`` (plus any genuinely new tensors and the small
records torch expects) and a new central directory that lists the new records beside the *old*
data records at their old offsets. No byte below the old end of the file is ever written, so the
previous version is still inside the file, complete: truncating the file to its old length gives
it back byte for byte (``optckpt restore``).

Crash safety rests on how zip readers find a zip: the end-of-central-directory record (EOCD) is
searched backwards from the end of the file, and miniz (torch's reader) follows its offsets to
the central directory wherever it lies. An edit is three writes::

    1. at the future end P: a copy of the *current* end records (zip64 EOCD, locator, EOCD with
       the comment ``optckpt-pend:<old length>``), pointing at the current central directory;
       the file now ends in a hole, then that copy: it still loads as the previous version
    2. into the hole: new records, the new central directory; fsync
    3. at P again, the same length: the new end records (comment ``optckpt-prev:<old length>``),
       pointing at the new central directory; fsync

Steps 1 and 3 are single writes of 146 bytes placed inside one 512-byte sector (so inside one
page), so a killed process leaves either the old or the new end records, never a mix (the kernel
copies a page at a time and checks for fatal signals between pages; devices write a sector
whole); everything step 3 points at is fsynced before it. Which central directory is used is
decided by the 32 bytes of the zip64 record alone (the EOCD's own fields say "see zip64"), so
even a torn step 3 would give one version or the other. A process killed between 1 and 3 leaves
a file that torch loads as the previous version; optckpt names that state, and ``optckpt
restore`` (truncation to the recorded length) clears it.

The new version is read back after step 3 (``verify``); a mismatch writes the copy of step 1
back and truncates: the previous version again. Comments are fixed-length, so the end records of
both kinds are the same size and step 3 overwrites step 1 exactly.

The comment is ``optckpt-prev:<old length, 20 digits>:crc32=<8 hex digits>`` (``pend`` alike), the
CRC-32 of every byte the append wrote before its end records (records, padding, central directory),
computed before step 1. ``restore`` cuts the file only after :func:`verify_previous` has found that
everything after the old length is exactly one such append (end records, directory, local headers
and padding rebuilt and compared byte for byte, each new record's CRC, the recorded CRC) and that
the old length holds a complete torch zip whose ``data.pkl`` CRC matches; a file whose comment lies,
or whose tail another tool changed or extended, is refused. Files appended before the CRC was
recorded (comment ``optckpt-prev:<20 digits>``) are still restorable when the structural checks and
the record CRCs pass."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import random
import re
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import WriteError
from ..tensors import has_record_tensors, materialize
from .editlock import interrupted_message, lock
from .readguard import file_mappings, offset_in
from .records import _source_records, central_entry, local_header, pickle_lazily, record_order
from .safepickle import pickle_module_for
from .zipscan import _PEND, _PREV  # (the end-record comments the parse reads)

__all__ = ["append_version", "restore_previous", "check_previous", "versions", "verify_previous", "end_state",
           "EndState"]

_SECTOR = 512  # the end records are written inside one sector (so inside one page)
_COMMENT_LEN = len(_PREV) + 20 + len(":crc32=") + 8
_LEGACY_COMMENT_LEN = len(_PREV) + 20  # written before the appended bytes' CRC was recorded
_END_LEN = 56 + 20 + 22 + _COMMENT_LEN  # zip64 EOCD record + zip64 locator + EOCD + comment
_COMMENT_RE = re.compile(rb"optckpt-(prev|pend):(\d{20})(?::crc32=([0-9a-f]{8}))?")
_READ = 1 << 24  # verification reads in chunks of this size
_EOCD_SIG, _LOC_SIG, _Z64_SIG = 0x06054B50, 0x07064B50, 0x06064B50
_SMALL = (".format_version", ".storage_alignment", "byteorder")  # written after data.pkl, as torch does


@dataclass(frozen=True)
class EndState:
    """What the end of a zip file says: its central directory, and optckpt's note if it wrote it."""

    entries: int
    cd_size: int
    cd_offset: int
    kind: str | None  # "prev": a version appended by optckpt; "pend": an append that did not finish
    previous_size: int | None  # the file's length before that append
    crc: int | None = None  # the CRC-32 of the appended bytes before the end records (None: not recorded)
    comment_len: int = 0


def end_state(fd: int, size: int) -> EndState | None:
    """Parse the end records of the zip in ``fd`` that ends at ``size`` (None: no zip ends there)."""
    start = max(0, size - (0xFFFF + 22 + 20 + 56))
    tail = os.pread(fd, size - start, start)
    at = tail.rfind(struct.pack("<I", _EOCD_SIG))
    if at < 0 or at + 22 > len(tail):
        return None
    _, _, _, _, n, cd_size, cd_off, clen = struct.unpack("<IHHHHIIH", tail[at:at + 22])
    if at + 22 + clen != len(tail):
        return None
    comment = tail[at + 22:]
    loc = at - 20
    if loc >= 0 and struct.unpack("<I", tail[loc:loc + 4])[0] == _LOC_SIG:
        z64_at = struct.unpack("<Q", tail[loc + 8:loc + 16])[0]
        rec = os.pread(fd, 56, z64_at)
        if len(rec) != 56 or struct.unpack("<I", rec[:4])[0] != _Z64_SIG:
            return None
        n, cd_size, cd_off = struct.unpack("<QQQ", rec[32:56])
    kind = prev = crc = None
    m = _COMMENT_RE.fullmatch(comment)
    if m is not None:
        kind, prev = m[1].decode(), int(m[2])
        crc = int(m[3], 16) if m[3] is not None else None
        if not 0 < prev < size:
            kind = prev = crc = None
    return EndState(n, cd_size, cd_off, kind, prev, crc, len(comment))


def _end_records(at: int, n: int, cd_size: int, cd_offset: int, comment: bytes) -> bytes:
    """zip64 EOCD record (at ``at``), its locator, and the EOCD whose fields say "see zip64"."""
    return (struct.pack("<IQHHIIQQQQ", _Z64_SIG, 44, 45, 45, 0, 0, n, n, cd_size, cd_offset)
            + struct.pack("<IIQI", _LOC_SIG, 0, at, 1)
            + struct.pack("<IHHHHIIH", _EOCD_SIG, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, len(comment))
            + comment)


def _pickle(obj: Any, key_for: Callable[[Any], str | None],
            fresh_from: int) -> tuple[bytes, list[str], dict[str, Any]]:
    """Pickle ``obj`` as torch's ``_save`` does, but a storage that is a record of the file keeps
    that record's key (``key_for``); any other storage gets a new key from ``fresh_from`` on and is
    returned to be written. A record key is given to one storage only: two storages never merge.
    Returns the pickle, every key it refers to, and the new storages by key."""
    import torch
    from torch.serialization import location_tag, normalize_storage_type

    ids: dict[int, str] = {}
    used: set[str] = set()
    new: dict[str, Any] = {}
    counter = [fresh_from]

    def persistent_id(o: Any) -> Any:
        if not (isinstance(o, torch.storage.TypedStorage) or torch.is_storage(o)):
            return None
        if isinstance(o, torch.storage.TypedStorage):
            storage = o._untyped_storage
            storage_type = getattr(torch, o._pickle_storage_type())
            numel = o._size()
        else:
            storage = o
            storage_type = normalize_storage_type(type(o))
            numel = storage.nbytes()
        key = ids.get(storage._cdata)
        if key is None:
            key = key_for(storage)
            if key is None or key in used:
                key = str(counter[0])
                counter[0] += 1
                new[key] = storage
            used.add(key)
            ids[storage._cdata] = key
        fake = getattr(o, "_fake_device", None)
        return ("storage", storage_type, key, str(fake) if fake is not None else location_tag(storage), numel)

    buf = io.BytesIO()
    pickler = pickle_module_for(obj).Pickler(buf, protocol=torch.serialization.DEFAULT_PROTOCOL)
    pickler.persistent_id = persistent_id  # (no class a call: a class is a cycle, keeping the storages met alive)
    pickler.dump(obj)
    return buf.getvalue(), list(ids.values()), new


def _storage_view(storage: Any, keep: list[Any]) -> memoryview:
    """A CPU view of a storage's bytes (no copy for CPU storages; a copy, kept alive in ``keep``,
    for others)."""
    if storage.device.type != "cpu":
        storage = storage.cpu()
    keep.append(storage)
    n = storage.nbytes()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(storage.data_ptr())).cast("B")


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:done + (1 << 30)], offset + done)
        if n <= 0:
            raise OSError(5, "Input/output error: short write")
        done += n


def _appended_by_optckpt(fd: int, size: int, base: int) -> bool:
    """Is the file of ``size`` bytes what was read (``base`` bytes) plus versions optckpt appended
    (each end record naming the one before, down to ``base``)? Then other optckpt edits landed."""
    for _ in range(64):
        state = end_state(fd, size)
        if state is None or state.kind != "prev" or state.previous_size is None or state.previous_size < base:
            return False
        if state.previous_size == base:
            return True
        size = state.previous_size
    return False


def append_version(path: str, obj: Any, *, verify: Callable[[str], None] | None = None,
                   expect_size: int | None = None) -> int:
    """Make ``obj`` the content of the torch zip file ``path`` by appending a new version (see the
    module docstring). Tensors of ``obj`` memory-mapped from ``path`` are referenced where they
    are; others are appended. ``expect_size``: the file's size when ``obj`` was read from it (a file
    that has grown since, another edit's version, is refused rather than silently overridden).
    Returns the bytes appended. On any failure the file holds its previous version again and
    :class:`WriteError` (or the caller's exception) is raised."""
    found = _source_records(path)
    if found is None:
        raise WriteError(f"{path}: not a plain torch zip file (compressed records?); cannot append a version")
    prefix, by_offset, small = found
    lazy = pickle_lazily(path, obj, by_offset, prefix) if has_record_tensors([obj]) else None
    if lazy is None:
        obj = materialize(obj)  # (before the file's mappings are listed: the tensors' own is among them)
    ranges = file_mappings(path) if lazy is None else []  # (only torch storages are found by address)
    fd = os.open(path, os.O_RDWR)
    try:
        lock(fd, path)
        size = os.fstat(fd).st_size
        if expect_size is not None and size != expect_size:
            if _appended_by_optckpt(fd, size, expect_size):  # concurrent optckpt edits landed meanwhile
                raise WriteError(f"{path}: another optckpt edit wrote this file in place while this one was "
                                 "running; nothing changed, run the command again on its result")
            raise WriteError(f"{path}: changed since optckpt read it ({expect_size} -> {size} bytes: another "
                             "edit?); nothing changed, run the command again")
        state = end_state(fd, size)
        if state is None:
            raise WriteError(f"{path}: no zip end record found; cannot append a version")
        if state.kind == "pend":
            raise WriteError(interrupted_message(path, state.previous_size, size, locked=True))
        data_prefix = f"{prefix}/data/"
        keys = {info.filename[len(data_prefix):]: (off, info) for off, info in by_offset.items()
                if info.filename.startswith(data_prefix)}

        def key_for(storage: Any) -> str | None:
            if storage.device.type != "cpu" or storage.nbytes() == 0:
                return None
            off = offset_in(ranges, storage.data_ptr())
            info = by_offset.get(off) if off is not None else None
            if info is None or info.file_size != storage.nbytes() or not info.filename.startswith(data_prefix):
                return None
            return str(info.filename[len(data_prefix):])

        numeric = [int(k) for k in keys if k.isascii() and k.isdigit()]  # (not "²": a digit int() refuses)
        if lazy is not None:  # tensors read lazily: references to this file's records, nothing new stored
            pickled, referenced = lazy
            new: dict[str, Any] = {}
        else:
            pickled, referenced, new = _pickle(obj, key_for, max(numeric, default=-1) + 1)
        pos = size
        writes: list[tuple[int, Any]] = []
        central: dict[str, bytes] = {}
        region = 0  # the CRC-32 of the appended bytes, in file order (recorded in the comment)

        def add(rel: str, payload: Any) -> None:
            nonlocal pos, region
            name = f"{prefix}/{rel}".encode()
            view = memoryview(payload).cast("B")
            crc = zlib.crc32(view)
            head = local_header(name, len(view), crc, pos)
            region = zlib.crc32(view, zlib.crc32(head, region))
            writes.append((pos, head))
            writes.append((pos + len(head), view))
            central[rel] = central_entry(name, len(view), crc, pos)
            pos += len(head) + len(view)

        add("data.pkl", pickled)
        for rel in _SMALL:
            if rel in small:
                add(rel, small[rel])
        alive: list[Any] = []
        for key, storage in new.items():
            add(f"data/{key}", _storage_view(storage, alive))
        add("version", small.get("version", b"3\n"))
        add(".data/serialization_id", "".join(random.choice("0123456789") for _ in range(40)).encode())
        order = [r for r in ("data.pkl", *_SMALL) if r in central]
        for key in record_order(set(referenced)):
            rel = f"data/{key}"
            if rel in central:
                order.append(rel)
            elif key in keys:
                off, info = keys[key]
                order.append(rel)
                # (its own flags, but the data-descriptor bit, which the directory need not repeat: its local
                # header stays as it is; torch's records: 0x0800, as optckpt has always listed them)
                central[rel] = central_entry(info.filename.encode(), info.file_size, info.CRC, info.header_offset,
                                             info.flag_bits & ~0x08)
            else:
                raise WriteError(f"{path}: internal: the new pickle names record data/{key}, which is nowhere")
        order += ["version", ".data/serialization_id"]
        cd = b"".join(central[r] for r in order)
        gap = 0 if (pos + len(cd)) % _SECTOR + _END_LEN <= _SECTOR else -(pos + len(cd)) % _SECTOR
        cd_at = pos + gap  # the end records within one sector: a gap before the directory, if need be
        end_at = cd_at + len(cd)
        region = zlib.crc32(cd, zlib.crc32(bytes(gap), region))  # the gap is a hole: zeros
        note = b"%020d:crc32=%08x" % (size, region)
        pending = _end_records(end_at, state.entries, state.cd_size, state.cd_offset, _PEND + note)
        final = _end_records(end_at, len(order), len(cd), cd_at, _PREV + note)
        assert len(pending) == len(final) == _END_LEN
        committed = False
        try:
            os.pwrite(fd, pending, end_at)  # 1: still the previous version
            for off, data in writes:  # 2: the new records and directory into the hole
                _pwrite_all(fd, data, off)
            _pwrite_all(fd, cd, cd_at)
            os.fsync(fd)
            if os.pwrite(fd, final, end_at) != len(final):  # 3: the new version
                raise OSError(5, "Input/output error: short write")
            committed = True
            os.fsync(fd)
            if verify is not None:
                verify(path)
        except BaseException:
            _roll_back(fd, size, end_at, pending if committed else None)
            raise
        return end_at + _END_LEN - size
    except OSError as e:
        raise WriteError(f"{path}: in-place write failed: {e.strerror or e} (the previous version is kept)") from None
    finally:
        os.close(fd)


def _roll_back(fd: int, size: int, end_at: int, pending: bytes | None) -> None:
    """Back to the version of ``size`` bytes: first its end records at the end (so the file never
    ends in the failed version's half), then the appended bytes cut off."""
    try:
        if pending is not None:
            os.pwrite(fd, pending, end_at)
            os.fsync(fd)
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass


class _Prefix(io.RawIOBase):
    """The first ``size`` bytes of ``fd`` as a seekable read-only file (for :mod:`zipfile`), by pread."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd, self._size, self._pos = fd, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        data = os.pread(self._fd, n, self._pos) if n else b""
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)


class _Unverified(Exception):
    """Why the bytes after a noted earlier version are not (only) an append optckpt wrote."""


def _directory(fd: int, size: int) -> list[Any]:
    """The records of the zip ending at ``size`` (stored records only)."""
    import zipfile

    try:
        with zipfile.ZipFile(_Prefix(fd, size)) as z:
            infos = z.infolist()
    except Exception as e:  # BadZipFile, ValueError, OSError, ... from a damaged or forged directory
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise _Unverified(f"no readable zip directory at byte {size} ({why})") from None
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise _Unverified(f"the zip at byte {size} has compressed records (torch.save never writes them)")
    return infos


def _torch_version_at(fd: int, size: int) -> tuple[EndState, list[Any]]:
    """The complete torch zip that ends at ``size``: its end records and records, each local header
    in place, its data in the file before the directory, its ``data.pkl`` CRC right."""
    state = end_state(fd, size)
    if state is None:
        raise _Unverified(f"no zip end record at byte {size}")
    infos = _directory(fd, size)
    pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pickles) != 1:
        raise _Unverified(f"the zip at byte {size} is not a torch.save file (no single data.pkl)")
    for i in infos:
        head = os.pread(fd, 30, i.header_offset)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise _Unverified(f"the zip at byte {size}: record {i.filename!r} has no local header")
        n, e = struct.unpack("<HH", head[26:30])
        if i.header_offset + 30 + n + e + i.file_size > state.cd_offset:
            raise _Unverified(f"the zip at byte {size}: record {i.filename!r} runs past its directory")
    pkl = pickles[0]
    n, e = struct.unpack("<HH", os.pread(fd, 30, pkl.header_offset)[26:30])
    if _crc_of(fd, pkl.header_offset + 30 + n + e, pkl.file_size) != pkl.CRC:
        raise _Unverified(f"the zip at byte {size}: data.pkl does not match its CRC")
    return state, infos


def _crc_of(fd: int, offset: int, length: int, crc: int = 0) -> int:
    done = 0
    while done < length:
        chunk = os.pread(fd, min(_READ, length - done), offset + done)
        if not chunk:
            raise _Unverified("the file is shorter than its directory says (changed while being read?)")
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
    return crc


def verify_previous(fd: int, size: int) -> int:
    """The length of the version before the last in-place edit of the file ``fd`` (of ``size``
    bytes), verified: raises :class:`_Unverified` unless everything after that length is exactly one
    append written by :func:`append_version` (or its unfinished start: "pending" end records that
    still point at the previous version's directory) and the previous version is a complete torch
    zip. What a restore would cut is then nothing but optckpt's own version."""
    state = end_state(fd, size)
    if state is None or state.kind is None or state.previous_size is None:
        raise _Unverified("holds no earlier version (it was not edited in place by optckpt)")
    prev = state.previous_size
    end_len = 56 + 20 + 22 + state.comment_len
    end_at = size - end_len
    if end_at < prev:
        raise _Unverified(f"its end records overlap the earlier version noted at byte {prev}")
    comment = os.pread(fd, state.comment_len, size - state.comment_len)
    if os.pread(fd, end_len, end_at) != _end_records(end_at, state.entries, state.cd_size, state.cd_offset, comment):
        raise _Unverified("its end records are not the ones optckpt writes")
    old, old_infos = _torch_version_at(fd, prev)
    if state.kind == "pend":  # an unfinished append: the end records still name the previous directory
        if (state.entries, state.cd_size, state.cd_offset) != (old.entries, old.cd_size, old.cd_offset):
            raise _Unverified("its unfinished-edit end records do not point at the earlier version's directory")
        return prev
    if state.cd_offset + state.cd_size != end_at or state.cd_offset < prev:
        raise _Unverified("its central directory is not where an optckpt append puts it")
    infos = _directory(fd, size)
    if len(infos) != state.entries:
        raise _Unverified("its central directory does not hold the records its end records count")
    cd = os.pread(fd, state.cd_size, state.cd_offset)
    if cd != b"".join(central_entry(i.filename.encode(), i.file_size, i.CRC, i.header_offset, i.flag_bits)
                      for i in infos):
        raise _Unverified("its central directory is not one optckpt writes")
    kept = {(i.filename, i.header_offset, i.file_size, i.CRC, i.flag_bits & ~0x08) for i in old_infos}
    new = sorted((i for i in infos if i.header_offset >= prev), key=lambda i: i.header_offset)
    if any(i.flag_bits != 0x0800 for i in new):
        raise _Unverified("its central directory is not one optckpt writes")
    for i in infos:  # (a record listed again: as the earlier version lists it, its flags but the descriptor bit)
        if i.header_offset < prev and (i.filename, i.header_offset, i.file_size, i.CRC, i.flag_bits) not in kept:
            raise _Unverified(f"record {i.filename!r} points into the earlier version at a record it does not have")
    if not any(i.filename.endswith("/data.pkl") for i in new):
        raise _Unverified("the appended bytes hold no new data.pkl")
    pos, region = prev, 0
    for i in new:
        if i.header_offset != pos:
            raise _Unverified(f"unexplained bytes at {pos} (the appended records do not follow one another)")
        head = local_header(i.filename.encode(), i.file_size, i.CRC, pos)
        if os.pread(fd, len(head), pos) != head:
            raise _Unverified(f"record {i.filename!r}: its local header is not the one optckpt writes")
        region = zlib.crc32(head, region)
        data_at = pos + len(head)
        if data_at + i.file_size > state.cd_offset:
            raise _Unverified(f"record {i.filename!r} runs into the central directory")
        crc = 0
        done = 0
        while done < i.file_size:
            chunk = os.pread(fd, min(_READ, i.file_size - done), data_at + done)
            if not chunk:
                raise _Unverified("the file is shorter than its directory says (changed while being read?)")
            crc = zlib.crc32(chunk, crc)
            region = zlib.crc32(chunk, region)
            done += len(chunk)
        if crc != i.CRC:
            raise _Unverified(f"record {i.filename!r} does not match its CRC (changed after optckpt appended it)")
        pos = data_at + i.file_size
    cd_end = pos + state.cd_size
    gap = 0 if cd_end % _SECTOR + end_len <= _SECTOR else -cd_end % _SECTOR
    if state.cd_offset != pos + gap:
        raise _Unverified(f"unexplained bytes between {pos} and the central directory at {state.cd_offset}")
    if gap:
        pad = os.pread(fd, gap, pos)
        if pad != bytes(gap):
            raise _Unverified(f"the padding at {pos} is not zeros")
        region = zlib.crc32(pad, region)
    region = zlib.crc32(cd, region)
    if state.crc is not None and region != state.crc:
        raise _Unverified(f"the appended bytes do not match the CRC recorded when optckpt appended them "
                          f"({region:08x}, recorded {state.crc:08x})")
    return prev


def check_previous(path: str) -> int:
    """What :func:`restore_previous` would cut ``path`` to (verified, nothing changed), or
    :class:`WriteError` saying why it would refuse."""
    with _reading(path) as fd:
        st = os.fstat(fd)
        _restorable(path, st)
        try:
            return verify_previous(fd, st.st_size)
        except _Unverified as e:
            raise WriteError(f"{path}: not restored: {e}; nothing changed") from None


@contextlib.contextmanager
def _reading(path: str) -> Iterator[int]:
    """``path`` open for reading; an OS failure (opening or reading) is one :class:`WriteError` line."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise WriteError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        yield fd
    except OSError as e:
        raise WriteError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _restorable(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise WriteError(f"{path}: not a regular file; nothing changed")
    if st.st_nlink > 1:
        raise WriteError(f"{path}: has {st.st_nlink} hard links; cutting it would cut the other names too "
                         "(as --in-place refuses to edit them); nothing changed")


def restore_previous(path: str) -> tuple[int, int]:
    """Undo the last in-place edit (or clear an interrupted one): truncate ``path`` to the length
    its end records note, once :func:`verify_previous` has shown that what is cut is exactly one
    append optckpt wrote. Returns (old size, new size). The bytes kept are exactly the previous
    version's: nothing below that length was ever written by the edit. Refused (nothing changed)
    for a file with other hard links (they would be cut too), and for one that changes meanwhile."""
    fd = os.open(path, os.O_RDWR)
    try:
        lock(fd, path)
        st = os.fstat(fd)
        _restorable(path, st)
        size = st.st_size
        try:
            prev = verify_previous(fd, size)
        except _Unverified as e:
            raise WriteError(f"{path}: not restored: {e}; nothing changed") from None
        now = os.fstat(fd)
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise WriteError(f"{path}: changed while being verified; nothing changed")
        os.ftruncate(fd, prev)
        os.fsync(fd)
        return size, prev
    except OSError as e:
        raise WriteError(f"{path}: cannot restore: {e.strerror or e}") from None
    finally:
        os.close(fd)


def versions(path: str) -> list[int]:
    """The lengths of the versions ``path`` holds, newest first: its size, then each previous
    version's size, as far back as each link verifies (:func:`verify_previous`; one entry: no
    earlier version)."""
    with _reading(path) as fd:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WriteError(f"{path}: not a regular file")
        sizes = [st.st_size]
        while True:
            try:
                prev = verify_previous(fd, sizes[-1])
            except (_Unverified, OSError):
                break
            if prev >= sizes[-1]:
                break
            sizes.append(prev)
        return sizes
