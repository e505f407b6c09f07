"""The zip structure of a torch file, parsed once, the way torch's reader (miniz) resolves it.

optckpt checks a torch zip file before ``torch.load`` reads it (the pickle's CRC, stored-only
records). Those checks are worth something only if they run on the records torch then loads. Zip
readers disagree on ambiguous files: Python's ``zipfile`` takes the zip64 end record just before
the zip64 locator and shifts every offset by any bytes it finds before the central directory;
miniz follows the locator's offset and takes offsets as written. So this module parses the file as
miniz does, and refuses (:class:`ZipStructureError`) every file on which the readers could
disagree, or whose bytes are not all accounted for:

- the end of central directory record (EOCD): the last signature with 22 bytes after it, searched
  backwards from the end in 4 KiB steps up to ~64 KiB (``mz_zip_reader_locate_header_sig``); its
  comment must end exactly at the end of the file and hold no other EOCD signature;
- a zip64 locator just before it must point at a zip64 end record just before the locator (where
  ``zipfile`` looks), of the standard size, one disk;
- the central directory ends exactly where the end records begin (no bytes a reader could take
  for a prefix), its entries fill it exactly, names unique (torch looks names up by a
  case-insensitive binary search);
- every entry stored (method 0), not encrypted; its local header agrees with it (name, method,
  flags but the data-descriptor bit, CRC and sizes, or zeros with a data descriptor after the
  data that agrees);
- records, the central directory and the end records do not overlap, and every byte of the file
  belongs to one of them, except the older versions optckpt's in-place edits leave (see
  :mod:`optckpt.io.append`: an EOCD comment ``optckpt-prev:<length>`` names the previous
  version, which must itself pass these rules, and the zero bytes that align a version's
  directory to a sector).
"""

from __future__ import annotations

import array
import operator
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress, repeat
from typing import Any, NamedTuple

from ..gcpause import gc_paused

__all__ = ["ZipEntry", "ZipLayout", "ZipStructureError", "ZipCorruptError", "parse_zip", "parse_fd", "parse_bytes"]

_EOCD_SIG, _LOC_SIG, _Z64_SIG = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
_CEN_SIG, _LOC_HDR_SIG, _DD_SIG = b"PK\x01\x02", b"PK\x03\x04", b"PK\x07\x08"
_PREV, _PEND = b"optckpt-prev:", b"optckpt-pend:"
# optckpt's end-record comment (append.py): the previous version's length, and since the appended
# bytes are checksummed their CRC (older files have the length alone)
_COMMENT_RE = re.compile(rb"optckpt-(prev|pend):(\d{20})(?::crc32=([0-9a-f]{8}))?")
_SECTOR = 512
_U32 = 0xFFFFFFFF
_ENCRYPTED = 0x0001 | 0x0040 | 0x2000  # traditional / strong encryption, masked local header
_MAX_VERSIONS = 100_000


class ZipStructureError(Exception):
    """A zip whose records readers could disagree on (or that hides records): refused."""


class ZipCorruptError(Exception):
    """A zip that is not complete (truncated, end records or directory missing or cut)."""


class ZipEntry(NamedTuple):
    """One record, as the central directory torch reads describes it (``ZipInfo``-like names).
    A named tuple: a 600k-record file builds 600k of them."""

    filename: str
    header_offset: int
    data_offset: int  # where the record's bytes start (after the local header)
    file_size: int
    compress_size: int
    compress_type: int
    flag_bits: int
    CRC: int
    end: int  # end of the record's extent: data, then its data descriptor if it has one


@dataclass(frozen=True)
class ZipLayout:
    entries: tuple[ZipEntry, ...]
    cd_offset: int
    cd_size: int
    size: int
    kind: str | None  # "prev" / "pend": optckpt's end-record comment, as in append.end_state
    previous_size: int | None
    versions: tuple[int, ...]  # the lengths of the older versions inside the file, newest first


_Reader = Callable[[int, int], bytes]  # (n, offset) -> up to n bytes read there


def parse_zip(path: str) -> ZipLayout:
    fd = os.open(path, os.O_RDONLY)
    try:
        return parse_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def parse_fd(fd: int, size: int) -> ZipLayout:
    return parse_reader(lambda n, at: os.pread(fd, n, at), size)


def parse_bytes(data: bytes) -> ZipLayout:
    """The same parse of a zip held in memory (a ``torch.save`` blob inside another checkpoint)."""
    view = memoryview(data)
    return parse_reader(lambda n, at: bytes(view[at:at + n]), len(data))


def _read(rd: _Reader, n: int, at: int) -> bytes:
    if at < 0 or n < 0:
        raise ZipCorruptError(f"offset {at} out of range")
    data = rd(n, at)
    if len(data) != n:
        raise ZipCorruptError(f"{n} bytes at offset {at} run past the end of the file")
    return data


def find_eocd(rd: _Reader, size: int) -> int | None:
    """Where miniz finds the EOCD: scanning 4 KiB windows backwards (3 bytes of overlap), the last
    signature with at least 22 bytes after it; giving up once ~64 KiB + 22 back."""
    buf_len = 4096
    if size < 22:
        return None
    cur = max(size - buf_len, 0)
    while True:
        n = min(buf_len, size - cur)
        buf = _read(rd, n, cur)
        end = min(n, size - 22 - cur + 4)
        i = buf.rfind(_EOCD_SIG, 0, end) if end >= 4 else -1
        if i >= 0:
            return cur + i
        if cur == 0 or size - cur >= 0xFFFF + 22:
            return None
        cur = max(cur - (buf_len - 3), 0)


@dataclass(frozen=True)
class _Version:
    layout: ZipLayout
    end_start: int  # where this version's end records start (zip64 record, or the EOCD)


def _parse_one(rd: _Reader, size: int, known: dict[int, ZipEntry] | None = None) -> _Version:
    at = find_eocd(rd, size)
    if at is None:
        raise ZipCorruptError("no end of central directory record")
    eocd = _read(rd, 22, at)
    _, disk, cd_disk, n_disk, n, cd_size, cd_off, clen = struct.unpack("<4sHHHHIIH", eocd)
    if at + 22 + clen != size:
        raise ZipStructureError(f"{size - at - 22 - clen:+d} bytes past the end record's declared comment "
                                f"(end record at {at})")
    comment = _read(rd, clen, at + 22) if clen else b""
    if _EOCD_SIG in comment:
        raise ZipStructureError("a second end record inside the end record's comment")
    kind = prev = None
    m = _COMMENT_RE.fullmatch(comment)
    if m is not None:  # optckpt's own end records (append.py): the previous version's length, and a CRC
        kind = m.group(1).decode()
        prev = int(m.group(2))
        if not 0 < prev < size:
            raise ZipStructureError(f"the end record names an earlier version of {prev} bytes in a "
                                    f"{size}-byte file")
    if kind == "pend":  # an interrupted in-place edit: named by the caller, nothing else parsed
        return _Version(ZipLayout((), 0, 0, size, kind, prev, ()), at)
    end_start = at
    if at >= 20 and _read(rd, 4, at - 20) == _LOC_SIG:
        loc = _read(rd, 20, at - 20)
        _, z64_disk, z64_at, disks = struct.unpack("<4sIQI", loc)
        if z64_at != at - 20 - 56:
            raise ZipStructureError(f"the zip64 locator points at byte {z64_at}, not at the zip64 end record "
                                    f"before it (byte {at - 76}): two readers would take different directories")
        if disks != 1 or z64_disk != 0:
            raise ZipStructureError(f"the zip64 locator says {disks} disks")
        rec = _read(rd, 56, z64_at)
        sig, rec_size, _, _, d1, d2, n1, n2, z_cd_size, z_cd_off = struct.unpack("<4sQHHIIQQQQ", rec)
        if sig != _Z64_SIG:
            raise ZipStructureError(f"no zip64 end record where the locator points (byte {z64_at})")
        if rec_size != 44 or d1 or d2 or n1 != n2:
            raise ZipStructureError("a non-standard zip64 end record (extensible data, disks or counts)")
        n, cd_size, cd_off = n2, z_cd_size, z_cd_off
        end_start = z64_at
    else:
        if disk or cd_disk or n_disk != n:
            raise ZipStructureError("a multi-disk end record")
        if _U32 in (cd_size, cd_off):
            raise ZipCorruptError("the end record says zip64, but no zip64 locator is there")
    if cd_off + cd_size > end_start:
        raise ZipCorruptError(f"the central directory ({cd_size} bytes at {cd_off}) runs past its end records")
    if cd_off + cd_size != end_start:
        raise ZipStructureError(f"{end_start - cd_off - cd_size} bytes between the central directory and its "
                                "end records (a prefix some readers shift every offset by)")
    if n > cd_size // 46:
        raise ZipCorruptError(f"{n} entries cannot fit a {cd_size}-byte central directory")
    cd = _read(rd, cd_size, cd_off)
    entries = _entries(rd, cd, n, cd_off, known)
    layout = ZipLayout(tuple(entries), cd_off, cd_size, size, kind, prev, ())
    return _Version(layout, end_start)


def _z64_extra(extra: bytes, wants: list[str], values: dict[str, int], where: str) -> None:
    """Fill the fields whose 32-bit value is 0xFFFFFFFF from the zip64 extra field (in order)."""
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack("<HH", extra[i:i + 4])
        if tag == 0x0001:
            body = extra[i + 4:i + 4 + ln]
            if len(body) < 8 * len(wants):
                raise ZipCorruptError(f"{where}: a short zip64 extra field")
            for k, name in enumerate(wants):
                values[name] = struct.unpack("<Q", body[8 * k:8 * k + 8])[0]
            return
        i += 4 + ln
    if wants:
        raise ZipCorruptError(f"{where}: sizes say zip64, but no zip64 extra field")


_CEN = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOC = struct.Struct("<4sHHHHHIIIHH")
_DD32 = struct.Struct("<4sIII")
_DD64 = struct.Struct("<4sIQQ")
_BATCH = 1 << 20  # local headers of small records are read together, up to this many bytes at a time
_SMALL = 64 << 10


class _Central(NamedTuple):
    raw: bytes
    name: str
    flags: int
    method: int
    crc: int
    size: int
    hoff: int


def _entries(rd: _Reader, cd: bytes, n: int, cd_off: int, known: dict[int, ZipEntry] | None = None
             ) -> list[ZipEntry]:
    fast = _entries_fast(rd, cd, n, cd_off, known)
    return fast if fast is not None else _entries_checked(rd, cd, n, cd_off)


def _entries_fast(rd: _Reader, cd: bytes, n: int, cd_off: int, known: dict[int, ZipEntry] | None = None
                  ) -> list[ZipEntry] | None:
    """The common file (what torch and optckpt write: ASCII names, no zip64 field, every entry
    stored) in column passes: the directory's fixed fields unpacked in bulk (:func:`_central_split`,
    else one ``unpack`` an entry), each rule one C-level test over a column, each local header checked
    by :func:`_locals_fast`. None where any rule might fail or any entry is unusual:
    :func:`_entries_checked` then parses again, entry by entry, and names what is wrong."""
    if not n:
        return None
    cols = _central_split(cd, n) or _central_walk(cd, n)
    if cols is None:
        return None
    raws, needs, flags, crcs, usizes, hoffs = cols
    if max(needs) > 63 or any(f & _ENCRYPTED for f in set(flags)) or _U32 in usizes or _U32 in hoffs:
        return None
    joined = b"\0".join(raws)
    if not joined.isascii():
        return None  # (ASCII reads the same in UTF-8 and cp437, whichever the flag says)
    folded = joined.lower().split(b"\0") if joined.count(b"\0") == n - 1 else [r.lower() for r in raws]
    if len(set(folded)) != n:  # names unique ignoring case (torch's lookup)
        return None
    names = list(map(bytes.decode, raws))
    return _locals_fast(rd, _Cols(raws, names, flags, crcs, usizes, hoffs), cd_off, known)


_Columns = tuple[list[bytes], list[int], list[int], list[int], list[int], list[int]]
_TAIL = 42  # a central entry's fixed fields after its signature (_CEN less the signature)
# (offset, width) in those 42 bytes: version needed, flags, method, CRC, sizes stored and read, lengths
# of name, extra field and comment, disk number, local header offset
_FIELDS = ((2, 2), (4, 2), (6, 2), (12, 4), (16, 4), (20, 4), (24, 2), (26, 2), (28, 2), (30, 2), (38, 4))
_ARRAY = {2: "H", 4: "I"}


def _field(fixed: bytes, n: int, at: int, width: int) -> list[int]:
    """One little-endian field of every entry, from their fixed parts laid end to end (``fixed``):
    its bytes gathered by strided copies, read as one array."""
    out = bytearray(width * n)
    for k in range(width):
        out[k::width] = fixed[at + k::_TAIL]
    col = array.array(_ARRAY[width], out)
    if sys.byteorder != "little":
        col.byteswap()
    return col.tolist()


def _central_split(cd: bytes, n: int) -> _Columns | None:
    """The directory's (names, versions needed, flags, CRCs, sizes, header offsets) from one split at
    the entry signature and a strided copy a field of the fixed parts, where that split is exactly the
    ``n`` entries: each piece as long as its own name, extra and comment lengths say, every entry
    stored with no disk number (a signature inside a name makes more pieces: None, and
    :func:`_central_walk` walks the entries instead)."""
    pieces = cd.split(_CEN_SIG)
    if len(pieces) != n + 1 or pieces[0]:
        return None
    del pieces[0]
    fixed = b"".join(map(operator.itemgetter(slice(0, _TAIL)), pieces))
    if len(fixed) != _TAIL * n:
        return None
    needs, flags, methods, crcs, csizes, usizes, nlens, elens, clens, disks, hoffs = (
        _field(fixed, n, at, width) for at, width in _FIELDS)
    name_ends = list(map(operator.add, nlens, repeat(_TAIL)))
    if list(map(len, pieces)) != list(map(operator.add, name_ends, map(operator.add, elens, clens))) \
            or set(methods) != {0} or csizes != usizes or not set(disks) <= {0, 0xFFFF}:
        return None
    raws: list[bytes] = list(map(bytes.__getitem__, pieces, map(slice, repeat(_TAIL), name_ends)))
    return raws, needs, flags, crcs, usizes, hoffs


def _central_walk(cd: bytes, n: int) -> _Columns | None:
    """:func:`_central_split`'s columns, one entry after the other (None: not the common file)."""
    unpack = _CEN.unpack_from
    size = len(cd)
    starts: list[int] = []
    kept: tuple[list[int], ...] = ([], [], [], [], [], [])
    needs, flags, crcs, usizes, nlens, hoffs = kept
    pos = 0
    left = n
    while left:  # in chunks: a row of 17 fields an entry is ~350 bytes, 200 MB at 600k if all were kept
        rows = []
        try:
            for _ in range(min(left, _CHUNK)):
                row = unpack(cd, pos)
                starts.append(pos)
                rows.append(row)
                pos += 46 + row[10] + row[11] + row[12]
        except struct.error:
            return None
        left -= len(rows)
        sigs, methods, csizes, disks = (list(map(operator.itemgetter(k), rows)) for k in (0, 4, 8, 13))
        for col, k in zip(kept, (2, 3, 7, 9, 10, 16)):
            col += map(operator.itemgetter(k), rows)
        if set(sigs) != {_CEN_SIG} or set(methods) != {0} or csizes != usizes[-len(rows):] \
                or not set(disks) <= {0, 0xFFFF}:
            return None
    if pos != size:
        return None
    raws = [cd[p + 46:p + 46 + k] for p, k in zip(starts, nlens)]
    return raws, needs, flags, crcs, usizes, hoffs


def _entries_checked(rd: _Reader, cd: bytes, n: int, cd_off: int) -> list[ZipEntry]:
    cen: list[_Central] = []
    seen: dict[str, str] = {}
    pos = 0
    unpack = _CEN.unpack_from
    for _ in range(n):
        if pos + 46 > len(cd) or cd[pos:pos + 4] != _CEN_SIG:
            raise ZipCorruptError(f"a bad central directory entry at byte {cd_off + pos}")
        (_, _, need, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk, _, _,
         hoff) = unpack(cd, pos)
        raw = cd[pos + 46:pos + 46 + nlen]
        if pos + 46 + nlen + elen + clen > len(cd):
            raise ZipCorruptError(f"a central directory entry past the directory's end (byte {cd_off + pos})")
        name = raw.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        if _U32 in (usize, csize, hoff):
            values = {"usize": usize, "csize": csize, "hoff": hoff}
            _z64_extra(cd[pos + 46 + nlen:pos + 46 + nlen + elen], [k for k in ("usize", "csize", "hoff")
                                                                    if values[k] == _U32], values, f"record {name!r}")
            usize, csize, hoff = values["usize"], values["csize"], values["hoff"]
        pos += 46 + nlen + elen + clen
        if need > 63:
            raise ZipCorruptError(f"record {name!r} needs zip version {need / 10:.1f}")
        if disk not in (0, 0xFFFF):
            raise ZipStructureError(f"record {name!r} on disk {disk}")
        if flags & _ENCRYPTED:
            raise ZipStructureError(f"record {name!r} is encrypted, which torch.save never writes")
        if method != 0:
            raise ZipStructureError(f"record {name!r} is compressed (method {method}), which torch.save never "
                                    "writes; refused (a zip bomb or a re-packed file)")
        if csize != usize:
            raise ZipStructureError(f"stored record {name!r} declares {csize} bytes stored and {usize} read")
        folded = name.lower()
        if folded in seen:
            raise ZipStructureError(f"two records named {seen[folded]!r} and {name!r} (torch's lookup ignores case)")
        seen[folded] = name
        cen.append(_Central(raw, name, flags, method, crc, usize, hoff))
    if pos != len(cd):
        raise ZipStructureError(f"{len(cd) - pos} bytes in the central directory after its {n} entries")
    return _locals(rd, cen, cd_off)


class _Batch:
    """Bytes of the file read once for several neighbouring local headers and data descriptors
    (a 600k-record file would otherwise cost two reads a record)."""

    __slots__ = ("rd", "buf", "at")

    def __init__(self, rd: _Reader):
        self.rd = rd
        self.buf = b""
        self.at = 0

    def load(self, at: int, n: int) -> None:
        self.buf = self.rd(n, at)
        self.at = at

    def get(self, n: int, at: int) -> bytes:
        """Up to ``n`` bytes at ``at`` (fewer only at the end of the file)."""
        off = at - self.at
        if 0 <= off and off + n <= len(self.buf):
            return self.buf[off:off + n]
        return self.rd(n, at)


def _locals(rd: _Reader, cen: list[_Central], limit: int) -> list[ZipEntry]:
    """Each central entry's local header (and data descriptor), checked against it. Records in
    file order whose extents are small are read together, one read per ~1 MiB."""
    order = sorted(range(len(cen)), key=lambda k: cen[k].hoff)
    batch = _Batch(rd)
    out: list[ZipEntry | None] = [None] * len(cen)
    k = 0
    while k < len(order):
        c = cen[order[k]]
        if c.size < _SMALL and not (batch.at <= c.hoff and c.hoff + c.size + 30 + len(c.raw) + 152
                                    <= batch.at + len(batch.buf)):
            j = k
            stop = min(c.hoff + _BATCH, limit)
            while j + 1 < len(order) and cen[order[j + 1]].size < _SMALL and cen[order[j + 1]].hoff < stop:
                j += 1
            last = cen[order[j]]
            batch.load(c.hoff, max(0, min(last.hoff + last.size + 30 + len(last.raw) + 152, limit) - c.hoff))
        out[order[k]] = _local(batch.get, c.raw, c.name, c.flags, c.method, c.crc, c.size, c.hoff, limit)
        k += 1
    return out  # type: ignore[return-value]


class _Cols(NamedTuple):
    """Central directory columns of the common file (``_entries_fast``)."""

    raws: list[bytes]
    names: list[str]
    flags: list[int]
    crcs: list[int]
    sizes: list[int]
    hoffs: list[int]


_CHUNK = 4096  # records checked by one bulk comparison
_LOC_PACK = _LOC.pack
_DD_PACK = _DD32.pack


def _locals_fast(rd: _Reader, c: _Cols, limit: int, known: dict[int, ZipEntry] | None = None
                 ) -> list[ZipEntry] | None:
    """:func:`_locals` for the common file, or None where any record is unusual. Records that follow
    each other (each ends where the next begins, as the coverage rule requires) are checked in chunks
    by two byte comparisons: their local headers and names against the headers torch writes for
    their central entries (flags with the data-descriptor bit, CRC and sizes zero, the extra field
    filling the gap; version, time and date, which _local does not compare, as the chunk's first)
    and their data descriptors against the CRC and sizes; a chunk that differs anywhere is checked
    in halves, then record by record (:func:`_locals_run`, which accepts exactly what :func:`_local`
    accepts). Records of an earlier version that a newer one shares (``known``) are not read again."""
    n = len(c.hoffs)
    datas = [0] * n
    ends = [0] * n
    if known:  # an earlier version: records a newer one shares were checked moments ago, in this parse
        rest = _known_records(c, known, datas, ends)
        if not _locals_run(rd, c, sorted(rest, key=c.hoffs.__getitem__), limit, datas, ends):
            return None
    elif c.hoffs != sorted(c.hoffs):  # (an appended directory lists the new pickle first): in file order
        order = sorted(range(n), key=c.hoffs.__getitem__)
        by_offset = _Cols._make(list(map(col.__getitem__, order)) for col in c)
        sorted_datas, sorted_ends = [0] * n, [0] * n
        if not _locals_in_order(rd, by_offset, limit, sorted_datas, sorted_ends):
            return None
        for j, i in enumerate(order):
            datas[i], ends[i] = sorted_datas[j], sorted_ends[j]
    elif not _locals_in_order(rd, c, limit, datas, ends):
        return None
    if max(ends) > limit:
        return None
    new = tuple.__new__
    return [new(ZipEntry, row) for row in zip(c.names, c.hoffs, datas, c.sizes, c.sizes, repeat(0), c.flags, c.crcs,
                                               ends)]


def _known_records(c: _Cols, known: dict[int, ZipEntry], datas: list[int], ends: list[int]) -> list[int]:
    """The records of an earlier version that a newer version does not share (the same local header:
    offset, name, size, CRC, flags but the data-descriptor bit), by C-level passes over the columns;
    the data offsets and ends of the shared ones are filled in (those of the others are the caller's)."""
    ks = list(map(known.get, c.hoffs, repeat(_UNKNOWN)))
    same = map(operator.eq, map(_SHARED, ks), zip(c.names, c.sizes, c.crcs))
    flags = map(operator.eq, map(operator.or_, map(_FLAG_BITS, ks), repeat(0x08)),
                map(operator.or_, c.flags, repeat(0x08)))
    datas[:] = map(_DATA, ks)
    ends[:] = map(_END, ks)
    return list(compress(range(len(ks)), map(operator.not_, map(operator.and_, same, flags))))


_UNKNOWN = ZipEntry("", -1, 0, -1, -1, 0, 0, -1, 0)  # (no record's: a size of -1)
_SHARED = operator.itemgetter(0, 3, 7)  # ZipEntry: filename, file_size, CRC
_FLAG_BITS, _DATA = operator.itemgetter(6), operator.itemgetter(2)


def _locals_in_order(rd: _Reader, c: _Cols, limit: int, datas: list[int], ends: list[int]) -> bool:
    """Records in file order: in chunks by :func:`_locals_bulk`; a chunk that declines (a gap: an
    older version's directory between records, or an unusual record) in halves, three times, then
    one by one."""
    n = len(c.hoffs)
    # spans (a, b, depth): records a .. b - 1, record b after them; in file order (a stack, not a
    # recursive closure: that would be a reference cycle keeping the columns alive)
    todo = [(a, min(a + _CHUNK, n - 1), 0) for a in range(0, n, _CHUNK)][::-1]
    while todo:
        a, b, depth = todo.pop()
        if b <= a or _locals_bulk(rd, c, a, b, datas, ends):
            continue
        if depth == 3 or b - a < 64:
            if not _locals_run(rd, c, range(a, b), limit, datas, ends):
                return False
            continue
        m = (a + b) // 2
        todo += ((m, b, depth + 1), (a, m, depth + 1))
    return _locals_run(rd, c, [n - 1], limit, datas, ends)  # the last record: no next header to end at


def _locals_bulk(rd: _Reader, c: _Cols, a: int, b: int, datas: list[int], ends: list[int]) -> bool:
    """Records ``a`` to ``b - 1`` (in file order, record ``b`` after them) in two comparisons, or
    False (nothing filled in) where they are not torch's contiguous layout."""
    hs = c.hoffs[a:b]
    nexts = c.hoffs[a + 1:b + 1]
    base = hs[0]
    nl = list(map(len, c.raws[a:b]))
    sz = c.sizes[a:b]
    data = [x - 16 - s for x, s in zip(nexts, sz)]  # the descriptor's 16 bytes end where the next header starts
    elens = [d - h - 30 - k for d, h, k in zip(data, hs, nl)]
    if min(elens) < 0 or max(elens) > 0xFFFF:
        return False
    if nexts[-1] - base <= 8 << 20:  # small records: one read for them all
        buf = rd(nexts[-1] - base, base)
        if len(buf) != nexts[-1] - base:
            return False
        got = b"".join([buf[h - base:h - base + 30 + k] for h, k in zip(hs, nl)])
        got_dd = b"".join([buf[x - base - 16:x - base] for x in nexts])
    else:  # big ones: one read a boundary (a descriptor and the next header lie side by side)
        pieces = [rd(46 + k, x - 16) for x, k in zip(nexts, map(len, c.raws[a + 1:b + 1]))]
        got = rd(30 + nl[0], base) + b"".join([p[16:] for p in pieces[:-1]])
        got_dd = b"".join([p[:16] for p in pieces])
    if len(got) < 30:
        return False
    # version, time and date (which _local does not compare) as the first header has them: torch writes
    # the same in every header, and its central entries agree; optckpt's appended directories need not
    need, _, _, time, date = struct.unpack_from("<HHHHH", got, 4)
    want = b"".join(map(bytes.__add__, map(_LOC_PACK, repeat(_LOC_HDR_SIG), repeat(need),
                                           [f | 0x08 for f in c.flags[a:b]], repeat(0), repeat(time), repeat(date),
                                           repeat(0), repeat(0), repeat(0), nl, elens), c.raws[a:b]))
    if got != want or got_dd != b"".join(map(_DD_PACK, repeat(_DD_SIG), c.crcs[a:b], sz, sz)):
        return False
    datas[a:b] = data
    ends[a:b] = nexts
    return True


def _locals_run(rd: _Reader, c: _Cols, indices: Any, limit: int, datas: list[int], ends: list[int]) -> bool:
    """The records ``indices`` (in file order) one by one, by :func:`_local` (small neighbours read
    together, as :func:`_locals` reads them); False at the first it refuses (the entry-by-entry parse
    then names it)."""
    batch = _Batch(rd)
    for i in indices:
        h, size, raw = c.hoffs[i], c.sizes[i], c.raws[i]
        if size < _SMALL and not (batch.at <= h and h + size + 30 + len(raw) + 152 <= batch.at + len(batch.buf)):
            batch.load(h, max(0, min(h + _BATCH, limit) - h))
        try:
            e = _local(batch.get, raw, c.names[i], c.flags[i], 0, c.crcs[i], size, h, limit)
        except (ZipStructureError, ZipCorruptError, struct.error):
            return False
        datas[i], ends[i] = e.data_offset, e.end
    return True


def _local(rd: _Reader, raw: bytes, name: str, flags: int, method: int, crc: int, size: int, hoff: int,
           limit: int) -> ZipEntry:
    """The local header of a central entry, checked against it; the record's extent."""
    if hoff + 30 > limit:
        raise ZipStructureError(f"record {name!r}: local header at {hoff}, inside or past the central directory")
    head = rd(min(30 + len(raw) + 128, limit - hoff), hoff)  # one read: header, name, usual extra
    if len(head) < 30:
        raise ZipCorruptError(f"record {name!r}: local header at {hoff} past the end of the file")
    (sig, _, lflags, lmethod, _, _, lcrc, lcsize, lusize, nlen, elen) = _LOC.unpack_from(head)
    if sig != _LOC_HDR_SIG:
        raise ZipStructureError(f"record {name!r}: no local header at byte {hoff}")
    rest = head[30:30 + nlen + elen]
    if len(rest) < nlen + elen:
        rest = _read(rd, nlen + elen, hoff + 30)
    lname, lextra = rest[:nlen], rest[nlen:]
    if lname != raw:
        raise ZipStructureError(f"record {name!r}: its local header names {lname.decode('utf-8', 'replace')!r}")
    # bit 3 (sizes in a data descriptor) is the local header's business: optckpt's appended directories
    # list torch's records (local 0x808) as 0x800; the descriptor is then checked against the entry
    if lflags & ~0x08 != flags & ~0x08 or lmethod != method:
        raise ZipStructureError(f"record {name!r}: local header flags/method {lflags:#x}/{lmethod} differ from "
                                f"the central directory's {flags:#x}/{method}")
    data = hoff + 30 + nlen + elen
    end = data + size
    if lusize == _U32 or lcsize == _U32:
        local_sizes = {"usize": lusize, "csize": lcsize}
        _z64_extra(lextra, [k for k in ("usize", "csize") if local_sizes[k] == _U32], local_sizes,
                   f"record {name!r} (local header)")
        lusize, lcsize = local_sizes["usize"], local_sizes["csize"]
    descriptor = lflags & 0x08
    if descriptor and lcrc == 0 and lusize == 0 and lcsize == 0:
        pass  # sizes in the data descriptor after the data
    elif lcrc != crc or lusize != size or lcsize != size:
        raise ZipStructureError(f"record {name!r}: local header says {lusize} bytes (CRC {lcrc:#x}), "
                                f"the central directory {size} (CRC {crc:#x})")
    if descriptor:
        z64 = hoff >= _U32 or size >= _U32
        dd = _read(rd, 24 if z64 else 16, end) if end + 16 <= limit else b""
        if dd[:4] != _DD_SIG:
            raise ZipStructureError(f"record {name!r}: no data descriptor after its {size} bytes")
        _, dcrc, dcs, dus = (_DD64 if z64 else _DD32).unpack(dd)
        if dcrc != crc or dcs != size or dus != size:
            raise ZipStructureError(f"record {name!r}: its data descriptor says {dus} bytes (CRC {dcrc:#x}), the "
                                    f"central directory {size} (CRC {crc:#x})")
        end += len(dd)
    if end > limit:
        raise ZipStructureError(f"record {name!r}: {size} bytes at {data} run into the central directory")
    return ZipEntry(name, hoff, data, size, size, method, flags, crc, end)


def parse_reader(rd: _Reader, size: int) -> ZipLayout:
    """The current version's records, every structure rule above checked over the whole file."""
    # millions of new acyclic tuples: the cyclic collector would rescan the growing heap again and again
    # (half the parse at 600k records)
    with gc_paused():
        return _parse_reader(rd, size)


def _parse_reader(rd: _Reader, size: int) -> ZipLayout:
    current = _parse_one(rd, size)
    if current.layout.kind == "pend":
        return current.layout  # an interrupted in-place edit: the caller names it (editlock.interrupted_message)
    chain = [current]
    known: dict[int, ZipEntry] = {}
    while chain[-1].layout.kind == "prev" and len(chain) < _MAX_VERSIONS:
        prev = chain[-1].layout.previous_size
        assert prev is not None
        known.update(zip(map(_HOFF, chain[-1].layout.entries), chain[-1].layout.entries))
        try:
            v = _parse_one(rd, prev, known)
        except (ZipStructureError, ZipCorruptError) as e:
            raise ZipStructureError(f"the earlier version noted at byte {prev}: {e}") from None
        if v.layout.kind == "pend":
            raise ZipStructureError(f"the earlier version noted at byte {prev} is an unfinished edit")
        chain.append(v)
    _check_coverage(rd, size, chain)
    layout = current.layout
    return ZipLayout(layout.entries, layout.cd_offset, layout.cd_size, size, layout.kind, layout.previous_size,
                     tuple(v.layout.size for v in chain[1:]))


def _check_coverage(rd: _Reader, size: int, chain: list[_Version]) -> None:
    """No two structures overlap (a record shared by versions is one), and every byte belongs to
    one, except zeros (under a sector) that align a version's central directory."""
    if not _covered(rd, size, chain):
        _coverage_error(rd, size, chain)


def _covered(rd: _Reader, size: int, chain: list[_Version]) -> bool:
    """The rule of :func:`_check_coverage` as C-level passes over columns of offsets; False where a
    span overlaps or a gap is not the zeros allowed (:func:`_coverage_error` then names it)."""
    lo: list[int] = []
    hi: list[int] = []
    cd_starts: set[int] = set()
    for v in chain:
        lay = v.layout
        lo += map(_HOFF, lay.entries)
        hi += map(_END, lay.entries)
        lo += (lay.cd_offset, v.end_start)
        hi += (lay.cd_offset + lay.cd_size, lay.size)
        cd_starts.add(lay.cd_offset)
    spans = sorted(dict.fromkeys(zip(lo, hi))) if len(chain) > 1 or lo != sorted(lo) else list(zip(lo, hi))
    starts = [a for a, _ in spans]
    stops = [0] + [b for _, b in spans]
    if stops[-1] != size:
        return False
    if starts == stops[:-1]:
        return True
    for a, b in zip(starts, stops):  # gaps: only zeros under a sector before a central directory
        if a != b and not (a > b and a in cd_starts and a - b < _SECTOR and _read(rd, a - b, b) == b"\0" * (a - b)):
            return False
    return True


_HOFF, _END = operator.itemgetter(1), operator.itemgetter(8)


def _coverage_error(rd: _Reader, size: int, chain: list[_Version]) -> None:
    spans: set[tuple[int, int, str]] = set()
    cd_starts: set[int] = set()
    for v in chain:
        lay = v.layout
        for e in lay.entries:
            spans.add((e.header_offset, e.end, f"record {e.filename!r}"))
        spans.add((lay.cd_offset, lay.cd_offset + lay.cd_size, "central directory"))
        spans.add((v.end_start, lay.size, "end records"))
        cd_starts.add(lay.cd_offset)
    by_start = sorted(spans)
    pos = 0
    last = "start of file"
    for lo, hi, what in by_start:
        if lo < pos:
            raise ZipStructureError(f"{what} at byte {lo} overlaps {last}")
        if lo > pos:
            gap = lo - pos
            if not (lo in cd_starts and gap < _SECTOR and _read(rd, gap, pos) == b"\0" * gap):
                raise ZipStructureError(f"{gap} bytes at offset {pos} belong to no record or directory "
                                        "(a hidden record or second directory?)")
        pos, last = hi, f"{what} at byte {lo}"
    if pos != size:
        raise ZipStructureError(f"{size - pos} bytes at offset {pos} belong to no record or directory")
