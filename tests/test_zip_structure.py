"""One zip parser: the records optckpt checks are the records torch loads (issue #27, item 1).

Python's ``zipfile`` and torch's reader (miniz) resolve an ambiguous zip differently (zipfile takes
the zip64 end record just before the locator and shifts offsets by any prefix; miniz follows the
locator), so one file can carry two central directories. optckpt parses the structure once, as
miniz does (``optckpt/io/zipscan.py``), and refuses files where readers could disagree.

The contract, for every structure-level mutant of real fixtures (and of a file after an
``--in-place`` edit): optckpt either refuses (exit 2, one line) or reads exactly what
``torch.load(weights_only=True)`` returns (values, not only keys)."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT, invoke

from optckpt.errors import LoadError
from optckpt.io import zipscan
from optckpt.io.torchfile import load_torch_file
from optckpt.io.zipscan import parse_zip

SEED_OPT = FIXTURES / "seed" / "optimizer_0.pth"
SEED_MODEL = FIXTURES / "seed" / "model_0.pth"
MODEL2 = str(FIXTURES / "models.py") + ":build_model2"
SIGS = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"PK\x07\x08")


# --- helpers ------------------------------------------------------------------------------------

def _same(a, b) -> bool:  # noqa: ANN001
    """Values equal, bit for bit for tensors (NaN equal to NaN), same types and structure."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.numel() == 0:
            return True
        return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                b.contiguous().reshape(-1).view(torch.uint8)))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def _contract(path: Path) -> str:
    """'refused' or 'same'; fails the test when optckpt reads something torch.load does not."""
    try:
        ours = load_torch_file(str(path)).obj
    except LoadError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(f"{path}: "), msg
        return "refused"
    try:
        theirs = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"optckpt read {path} but torch.load(weights_only=True) raises: {e}")
    assert _same(ours, theirs), f"{path}: optckpt and torch.load read different values"
    return "same"


def _cli_refuses(path: Path, words: str = "") -> str:
    r = invoke("inspect", str(path))
    assert r.exit_code == 2, (r.exit_code, r.stdout[-500:], r.stderr)
    assert r.stderr.startswith(f"optckpt: error: {path}: ") and r.stderr.count("\n") == 1, r.stderr
    assert words in r.stderr, r.stderr
    return r.stderr


def _tail(b: bytes) -> tuple[int, int, int, int, int]:
    """(zip64 record, locator, EOCD, cd offset, cd size) of a torch file (always zip64)."""
    eocd = b.rfind(b"PK\x05\x06")
    loc = eocd - 20
    assert b[loc:loc + 4] == b"PK\x06\x07"
    z64 = struct.unpack("<Q", b[loc + 8:loc + 16])[0]
    cd_size, cd_off = struct.unpack("<QQ", b[z64 + 40:z64 + 56])
    return z64, loc, eocd, cd_off, cd_size


def _end_records(z64_at: int, n: int, cd_size: int, cd_off: int, comment: bytes = b"") -> bytes:
    return (struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_off)
            + struct.pack("<4sIQI", b"PK\x06\x07", 0, z64_at, 1)
            + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, len(comment))
            + comment)


def _cd_entries(b: bytes, cd_off: int, cd_size: int) -> list[tuple[bytes, int, int]]:
    """(raw entry bytes, entry start, local header offset) for each central entry."""
    out = []
    pos = cd_off
    while pos < cd_off + cd_size:
        nlen, elen, clen = struct.unpack("<HHH", b[pos + 28:pos + 34])
        ln = 46 + nlen + elen + clen
        out.append((b[pos:pos + ln], pos, struct.unpack("<I", b[pos + 42:pos + 46])[0]))
        pos += ln
    return out


def _entry_name(raw: bytes) -> bytes:
    return raw[46:46 + struct.unpack("<H", raw[28:30])[0]]


def _with_fields(raw: bytes, *, method: int | None = None, crc: int | None = None, csize: int | None = None,
                 usize: int | None = None, offset: int | None = None) -> bytes:
    e = bytearray(raw)
    if method is not None:
        e[10:12] = struct.pack("<H", method)
    if crc is not None:
        e[16:20] = struct.pack("<I", crc)
    if csize is not None:
        e[20:24] = struct.pack("<I", csize)
    if usize is not None:
        e[24:28] = struct.pack("<I", usize)
    if offset is not None:
        e[42:46] = struct.pack("<I", offset)
    return bytes(e)


def _local_header(name: bytes, method: int, crc: int, csize: int, usize: int) -> bytes:
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0x800, method, 0, 0x21, crc, csize, usize,
                       len(name), 0) + name


def _two_directories(base: bytes, hidden: dict[bytes, tuple[bytes, int, int, int]]) -> bytes:
    """``base`` plus hidden records and a second central directory that miniz (torch) follows
    through the zip64 locator, while Python's zipfile keeps the original one (the zip64 record
    just before the locator). ``hidden``: record name -> (stored bytes, method, crc, declared size)."""
    z64, _, _, cd_off, cd_size = _tail(base)
    body = bytearray(base[:z64])
    visible_cd = base[cd_off:cd_off + cd_size]
    entries = _cd_entries(base, cd_off, cd_size)
    hidden_cd = bytearray()
    replaced: dict[bytes, bytes] = {}
    for name, (data, method, crc, declared) in hidden.items():
        at = len(body)
        body += _local_header(name, method, crc, len(data), declared) + data
        replaced[name] = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0x800, method, 0, 0x21, crc,
                                     len(data), declared, len(name), 0, 0, 0, 0, 0, at) + name
    for raw, _, _ in entries:
        hidden_cd += replaced.get(_entry_name(raw), raw)
    hidden_cd_at = len(body)
    body += hidden_cd
    hidden_z64 = len(body)
    body += _end_records(0, len(entries), len(hidden_cd), hidden_cd_at)[:56]
    visible_cd_at = len(body)
    body += visible_cd
    # the end records: zip64 record (the visible directory) just before a locator that points at the hidden one
    tail = _end_records(hidden_z64, len(entries), len(visible_cd), visible_cd_at)
    z64_rec = tail[:56]
    body += z64_rec + tail[56:]
    # fix the visible zip64 record's locator target: Python reads the record before the locator,
    # so the locator keeps pointing at the hidden record
    return bytes(body)


def _name_of(base: bytes, suffix: str) -> bytes:
    _, _, _, cd_off, cd_size = _tail(base)
    names = [_entry_name(r) for r, _, _ in _cd_entries(base, cd_off, cd_size)]
    return next(n for n in names if n.endswith(suffix.encode()))


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:  # noqa: ANN001
    d = tmp_path_factory.mktemp("bases")
    out = {"bundle": d / "bundle.pt", "optimizer": d / "optimizer_0.pth", "in_place": d / "in_place.pth"}
    shutil.copy(FIXTURES / "bundle.pt", out["bundle"])
    shutil.copy(SEED_OPT, out["optimizer"])
    shutil.copy(SEED_OPT, out["in_place"])
    r = invoke("remap", str(out["in_place"]), "--model", str(SEED_MODEL), "--target", MODEL2, "--in-place")
    assert r.exit_code == 0, r.stderr
    assert parse_zip(str(out["in_place"])).versions == (SEED_OPT.stat().st_size,)
    return out


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --- the unmodified files, and optckpt's own versions -------------------------------------------

@pytest.mark.parametrize("name", ["bundle", "optimizer", "in_place"])
def test_real_files_are_read_as_torch_reads_them(bases, name):
    assert _contract(bases[name]) == "same"


def test_every_older_version_of_an_in_place_file_is_a_valid_chain(bases, tmp_path):
    p = _write(tmp_path, "twice.pth", bases["in_place"].read_bytes())
    r = invoke("set", str(p), "--lr", "0.005", "--in-place")
    assert r.exit_code == 0, r.stderr
    assert len(parse_zip(str(p)).versions) == 2
    assert _contract(p) == "same"


# --- the two concrete attacks -------------------------------------------------------------------

_BOMB_SIZE = 2 << 30


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:  # noqa: ANN001
    """data.pkl, DEFLATE-compressed, declared 2 GiB (the pickle, then zeros), behind a second directory."""
    base = (FIXTURES / "seed" / "optimizer_0.pth").read_bytes()
    z64, _, _, cd_off, cd_size = _tail(base)
    name = _name_of(base, "/data.pkl")
    import zipfile

    pickle_bytes = zipfile.ZipFile(FIXTURES / "seed" / "optimizer_0.pth").read(name.decode())
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [comp.compress(pickle_bytes), comp.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(pickle_bytes)
    zeros = b"\0" * (64 << 20)
    # a full flush forgets the history: every 64 MiB block of zeros compresses to the same bytes,
    # so one is compressed and repeated (one valid DEFLATE stream, six times faster to build)
    block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    n, rest = divmod(_BOMB_SIZE - len(pickle_bytes), len(zeros))
    parts.append(block * n)
    for _ in range(n):
        crc = zlib.crc32(zeros, crc)
    parts.append(comp.compress(zeros[:rest]) + comp.flush())
    crc = zlib.crc32(zeros[:rest], crc)
    data = b"".join(parts)
    p = tmp_path_factory.mktemp("bomb") / "bomb.pt"
    p.write_bytes(_two_directories(base, {name: (data, 8, crc, _BOMB_SIZE)}))
    assert p.stat().st_size < 4 << 20
    return p


def test_python_zipfile_sees_the_innocent_directory(bomb):
    """The attack as built: Python's zipfile (what optckpt used to check) sees stored records only."""
    import zipfile

    with zipfile.ZipFile(bomb) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        z.testzip()


def test_deflate_bomb_behind_a_second_directory_is_refused_in_bounded_memory(bomb):
    script = textwrap.dedent(f"""
        import resource, subprocess, sys, time
        t = time.time()
        r = subprocess.run([sys.executable, "-m", "optckpt", "inspect", {str(bomb)!r}], capture_output=True,
                           text=True, cwd={str(ROOT)!r}, timeout=600)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(r.returncode, peak, round(time.time() - t, 2))
        sys.stdout.write(r.stderr)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=700, cwd=ROOT)
    first, _, stderr = r.stdout.partition("\n")
    code, peak_kb, seconds = first.split()
    print("bomb: exit", code, "peak RSS", int(peak_kb) // 1024, "MB", seconds, "s")
    assert int(code) == 2, r.stdout
    assert stderr.startswith(f"optckpt: error: {bomb}: ambiguous zip structure: ") and stderr.count("\n") == 1, stderr
    assert int(peak_kb) < 500 * 1024, f"peak RSS {int(peak_kb) // 1024} MB"


def _nan_attack(base_path: Path) -> bytes:
    """A tensor record whose hidden entry is DEFLATE-compressed NaNs: mmap=True takes the raw
    compressed bytes as the tensor, plain torch.load inflates them."""
    base = base_path.read_bytes()
    z64, _, _, cd_off, cd_size = _tail(base)
    entries = _cd_entries(base, cd_off, cd_size)
    target = max((r for r, _, _ in entries if b"/data/" in _entry_name(r)),
                 key=lambda r: struct.unpack("<I", r[24:28])[0])
    size = struct.unpack("<I", target[24:28])[0]
    payload = (struct.pack("<f", float("nan")) * (size // 4 + 1))[:size]
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = comp.compress(payload) + comp.flush()
    return _two_directories(base, {_entry_name(target): (data, 8, zlib.crc32(payload), size)})


@pytest.mark.parametrize("name", ["bundle", "optimizer"])
def test_hidden_compressed_tensor_of_nans_is_refused(bases, tmp_path, name):
    p = _write(tmp_path, f"nan_{name}.pt", _nan_attack(bases[name]))
    plain = torch.load(p, weights_only=True)
    mapped = torch.load(p, weights_only=True, mmap=True)
    assert not _same(plain, mapped)  # the attack works on torch: two readings of one file
    _cli_refuses(p, "ambiguous zip structure")
    assert _contract(p) == "refused"
    r = invoke("diff", str(bases[name]), str(p))
    assert r.exit_code == 2 and "ambiguous zip structure" in r.stderr, r.stdout[-300:] + r.stderr


def test_hidden_stored_pickle_is_refused(bases, tmp_path):
    """The data.pkl whose CRC is checked must be the one loaded: a second, stored data.pkl that
    torch would load (a different learning rate) behind the locator."""
    import zipfile

    base = bases["optimizer"].read_bytes()
    name = _name_of(base, "/data.pkl")
    pkl = zipfile.ZipFile(bases["optimizer"]).read(name.decode())
    changed = pkl.replace(struct.pack(">d", 0.001), struct.pack(">d", 0.5))
    p = _write(tmp_path, "pkl.pt", _two_directories(base, {name: (changed, 0, zlib.crc32(changed), len(changed))}))
    _cli_refuses(p, "ambiguous zip structure")


# --- deterministic structure mutants ------------------------------------------------------------

def _mutants(b: bytes) -> dict[str, bytes]:
    z64, loc, eocd, cd_off, cd_size = _tail(b)
    end = b[z64:]
    entries = _cd_entries(b, cd_off, cd_size)
    first_raw, first_at, first_hdr = entries[0]
    data_raws = [e for e in entries if b"/data/" in _entry_name(e[0])]
    out: dict[str, bytes] = {}
    out["trailing_bytes"] = b + b"\0" * 7
    out["duplicate_end_records"] = b + end
    dup = _end_records(len(b), len(entries), cd_size, cd_off)
    out["second_end_records_consistent"] = b + dup
    out["end_records_shifted"] = b[:z64] + b"\0" * 64 + _end_records(z64 + 64, len(entries), cd_size, cd_off,
                                                                      b[eocd + 22:])
    out["locator_points_elsewhere"] = b[:loc + 8] + struct.pack("<Q", z64 - 8) + b[loc + 16:]
    out["locator_points_at_end"] = b[:loc + 8] + struct.pack("<Q", len(b) - 56) + b[loc + 16:]
    out["locator_second_z64_record"] = (b[:z64] + _end_records(0, len(entries), cd_size, cd_off)[:56]
                                        + _end_records(z64 + 56, len(entries), cd_size, cd_off))
    out["eocd_in_comment"] = b[:-2] + struct.pack("<H", 26) + b"PK\x05\x06" + b"\0" * 22
    out["prefix_bytes"] = b"\0" * 100 + b  # zipfile shifts offsets by the prefix, miniz does not
    out["junk_between_cd_and_end"] = b[:z64] + b"PK\x03\x04junk" + _end_records(z64 + 8, len(entries), cd_size,
                                                                                 cd_off)
    # central / local mismatches
    cd = bytearray(b[cd_off:cd_off + cd_size])
    rel = first_at - cd_off

    comment = b[eocd + 22:]  # an in-place file's "optckpt-prev:" note: kept

    def with_cd(new_cd: bytes, extra: bytes = b"", n: int = len(entries)) -> bytes:
        body = b[:cd_off] + extra
        return body + new_cd + _end_records(len(body) + len(new_cd), n, len(new_cd), len(body), comment)

    def patched(raw: bytes, **kw: int) -> bytes:
        c = bytearray(cd)
        at = b.index(raw, cd_off) - cd_off
        c[at:at + len(raw)] = _with_fields(raw, **kw)
        return bytes(c)

    pkl_size = struct.unpack("<I", first_raw[24:28])[0]
    out["central_size_smaller"] = with_cd(patched(first_raw, csize=pkl_size - 1, usize=pkl_size - 1))
    out["central_size_larger"] = with_cd(patched(first_raw, csize=pkl_size + 8, usize=pkl_size + 8))
    out["central_crc_differs"] = with_cd(patched(first_raw, crc=1234))
    out["central_method_deflate"] = with_cd(patched(first_raw, method=8))
    out["central_offset_into_record"] = with_cd(patched(first_raw, offset=first_hdr + 4))
    c = bytearray(cd)
    c[rel + 8] ^= 0x01  # encrypted bit
    out["encrypted_flag"] = with_cd(bytes(c))
    c = bytearray(cd)
    c[rel + 46] ^= 0x20  # name case: the local header's differs
    out["local_name_differs"] = with_cd(bytes(c))
    lb = bytearray(b)
    lb[first_hdr + 6] ^= 0x40  # local flags
    out["local_flags_differ"] = bytes(lb)
    lb = bytearray(b)
    lb[first_hdr + 8] = 8  # local method
    out["local_method_deflate"] = bytes(lb)
    if data_raws:
        d_raw, _, d_hdr = data_raws[0]
        d_size = struct.unpack("<I", d_raw[24:28])[0]
        lb = bytearray(b)
        lb[d_hdr + 18:d_hdr + 26] = struct.pack("<II", d_size + 4, d_size + 4)  # local sizes
        out["local_sizes_differ"] = bytes(lb)
        out["tensor_record_larger"] = with_cd(patched(d_raw, csize=d_size + 64, usize=d_size + 64))
        if len(data_raws) > 1:  # two entries for one record: overlapping
            out["two_entries_one_record"] = with_cd(patched(data_raws[1][0], offset=d_hdr))
        # a genuine-looking record inside another record's data: overlapping
        big_raw, _, big_hdr = max(data_raws, key=lambda e: struct.unpack("<I", e[0][24:28])[0])
        big_size = struct.unpack("<I", big_raw[24:28])[0]
        inner = _local_header(_entry_name(big_raw)[:-1] + b"Z", 0, zlib.crc32(b"\0" * 4), 4, 4) + b"\0" * 4
        nl, el = struct.unpack("<HH", b[big_hdr + 26:big_hdr + 30])
        start = big_hdr + 30 + nl + el
        if big_size >= len(inner):
            ib = bytearray(b)
            ib[start:start + len(inner)] = inner
            entry = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0x800, 0, 0, 0x21,
                                zlib.crc32(b"\0" * 4), 4, 4, len(_entry_name(big_raw)), 0, 0, 0, 0, 0,
                                start) + _entry_name(big_raw)[:-1] + b"Z"
            body = bytes(ib[:cd_off])
            new_cd = bytes(cd) + entry
            out["record_inside_another"] = body + new_cd + _end_records(len(body) + len(new_cd), len(entries) + 1,
                                                                       len(new_cd), len(body), comment)
    # duplicate names (torch's lookup folds case)
    dup_entry = first_raw
    out["duplicate_entry"] = with_cd(bytes(cd) + dup_entry, n=len(entries) + 1)
    # a record hidden in a gap between records (no directory names it)
    hidden = _local_header(b"x/data/999", 0, 0, 4, 4) + b"\0" * 4
    out["unlisted_record_before_cd"] = with_cd(bytes(cd), hidden)
    return out


MUTANT_NAMES = sorted(_mutants((FIXTURES / "seed" / "optimizer_0.pth").read_bytes()))


@pytest.mark.parametrize("base", ["bundle", "optimizer", "in_place"])
def test_structure_mutants_are_refused_or_read_as_torch_reads_them(bases, tmp_path, base):
    outcomes: dict[str, str] = {}
    for name, data in _mutants(bases[base].read_bytes()).items():
        p = _write(tmp_path, f"{name}.pt", data)
        outcomes[name] = _contract(p)
    print(base, outcomes)
    # these are ambiguous by construction: refused, every one
    assert {k for k, v in outcomes.items() if v != "refused"} == set(), outcomes


@pytest.mark.parametrize("name", ["duplicate_end_records", "locator_points_elsewhere", "local_name_differs",
                                  "central_method_deflate", "two_entries_one_record", "prefix_bytes"])
def test_cli_refuses_in_one_line(bases, tmp_path, name):
    p = _write(tmp_path, f"{name}.pt", _mutants(bases["bundle"].read_bytes())[name])
    _cli_refuses(p)


# --- random structure-level fuzzer --------------------------------------------------------------

def _structure_positions(b: bytes) -> list[int]:
    out = []
    for sig in SIGS:
        i = b.find(sig)
        while i >= 0:
            out.append(i)
            i = b.find(sig, i + 1)
    return sorted(out)


def _fuzz_one(b: bytes, rng: random.Random) -> bytes:
    pos = _structure_positions(b)
    m = bytearray(b)
    op = rng.randrange(6)
    at = rng.choice(pos)
    if op == 0:  # one byte of a header
        i = at + rng.randrange(4, 46)
        if i < len(m):
            m[i] = rng.choice([0, 0xFF, (m[i] + 1) & 0xFF, (m[i] - 1) & 0xFF, rng.randrange(256)])
    elif op == 1:  # a 4- or 8-byte field: another structure's offset
        i = at + rng.randrange(4, 44)
        width = rng.choice([4, 8])
        m[i:i + width] = rng.choice(pos).to_bytes(width, "little")[:len(m[i:i + width])]
    elif op == 2:  # insert bytes at a structure boundary
        m[at:at] = rng.choice([b"\0" * rng.randrange(1, 80), b"PK\x05\x06", b"PK\x01\x02" + b"\0" * 42])
    elif op == 3:  # delete bytes at a structure boundary
        del m[at:at + rng.randrange(1, 40)]
    elif op == 4:  # a copy of a structure elsewhere
        piece = b[at:at + rng.randrange(22, 120)]
        to = rng.choice(pos + [len(m)])
        m[to:to] = piece
    else:  # the end records appended again (possibly altered)
        tail = b[b.rfind(b"PK\x06\x06"):]
        t = bytearray(tail)
        j = rng.randrange(len(t))
        t[j] = rng.randrange(256)
        m += bytes(t)
    return bytes(m)


@pytest.mark.parametrize("base", ["bundle", "optimizer", "in_place"])
def test_structure_fuzz(bases, tmp_path, base):
    rng = random.Random(f"zip-structure-{base}")
    b = bases[base].read_bytes()
    counts = {"refused": 0, "same": 0}
    for k in range(250):
        p = _write(tmp_path, f"m{k}.pt", _fuzz_one(b, rng))
        counts[_contract(p)] += 1
    print(base, counts)
    assert counts["refused"] > 0


# --- a storage must be exactly its record ---------------------------------------------------------

@pytest.mark.parametrize("cut", [8, 24])
def test_pickle_reading_past_or_short_of_its_record_is_refused(tmp_path, cut):
    """With mmap=True torch takes the pickle's nbytes from where a record's data starts, whatever
    the record's size (past it: the next header's bytes as values); plain torch.load refuses. A
    well-formed zip otherwise (written by Python's zipfile: no zip64, sizes in the local headers)."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"a": torch.arange(4.0), "b": torch.arange(8.0)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    p = tmp_path / "short.pt"
    with zipfile.ZipFile(p, "w") as out:
        for i in src.infolist():
            d = src.read(i)
            if i.filename.endswith("data/0"):
                d = (d + b"\0" * 16)[:cut]
            out.writestr(i.filename, d)
    with pytest.raises(RuntimeError):
        torch.load(p, weights_only=True)
    torch.load(p, weights_only=True, mmap=True)  # reads it, one way or the other
    _cli_refuses(p, "ambiguous zip structure: the pickle reads 16 bytes from record")


def test_a_plain_zipfile_written_checkpoint_is_read(tmp_path):
    """No zip64 end records, sizes in the local headers, no data descriptors: still torch's records."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"a": torch.arange(4.0), "b": torch.tensor([float("nan"), 1.0])}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    p = tmp_path / "plain.pt"
    with zipfile.ZipFile(p, "w") as out:
        for i in src.infolist():
            out.writestr(i.filename, src.read(i))
    assert _contract(p) == "same"


@pytest.mark.parametrize("extra", [None, "data/\u00b2"])
def test_a_plain_zipfile_written_checkpoint_is_edited_in_place_and_restored(tmp_path, extra):
    """A checkpoint re-packed by Python's ``zipfile`` (records without the UTF-8 flag; one record named by
    a Unicode digit, which ``int()`` refuses) is edited in place like torch's own files: the records listed
    again keep their own flags (listed with optckpt's, the file's own check refused the result), the
    edit reads back in torch, and ``restore`` gives back the very bytes."""
    import io
    import zipfile

    buf = io.BytesIO()
    params = [torch.nn.Parameter(torch.ones(3))]
    torch.save({"model": {"w": params[0].detach()}, "optimizer": torch.optim.SGD(params, lr=0.1).state_dict()}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    p = tmp_path / "plain.pt"
    with zipfile.ZipFile(p, "w") as out:
        for i in src.infolist():
            out.writestr(i.filename, src.read(i))
        if extra:
            out.writestr(src.infolist()[0].filename.split("/")[0] + "/" + extra, b"\0" * 4)
    before = p.read_bytes()
    r = invoke("set", str(p), "--lr", "0.5", "--in-place")
    assert r.exit_code == 0, r.stderr
    assert torch.load(p, weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 0.5
    r = invoke("restore", str(p))
    assert r.exit_code == 0, r.stderr
    assert p.read_bytes() == before


def test_an_interrupted_in_place_edit_is_named(tmp_path):
    """Step 1 of an in-place edit done (a hole, then "pending" end records pointing at the old
    directory): refused with the way out, not as an ambiguous structure."""
    b = SEED_OPT.read_bytes()
    _, _, _, cd_off, cd_size = _tail(b)
    n = len(_cd_entries(b, cd_off, cd_size))
    at = len(b) + 1000
    p = tmp_path / "pend.pth"
    p.write_bytes(b + b"\0" * 1000 + _end_records(at, n, cd_size, cd_off, b"optckpt-pend:%020d" % len(b)))
    err = _cli_refuses(p, "optckpt restore")
    assert "ambiguous" not in err
    assert invoke("restore", str(p)).exit_code == 0
    assert p.read_bytes() == b


def test_in_memory_torch_blobs_get_the_same_rules(bases):
    """DCP byte entries are torch.save blobs that torch.load reads from memory: checked first."""
    import io
    import zipfile

    from optckpt.io.torchfile import check_zip_bytes

    buf = io.BytesIO()
    torch.save({"lr": 0.1, "t": torch.ones(3)}, buf)
    check_zip_bytes(buf.getvalue(), "entry")  # torch's own blob: fine
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as out:
        for i in src.infolist():
            out.writestr(i.filename, src.read(i), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(LoadError, match="entry: ambiguous zip structure: .*compressed"):
        check_zip_bytes(packed.getvalue(), "entry")
    with pytest.raises(LoadError, match="entry: ambiguous zip structure: the zip64 locator"):
        check_zip_bytes(_nan_attack(bases["bundle"]), "entry")


# --- the column-pass parse decides exactly as the entry-by-entry parse -----------------------------

def _outcome(data: bytes) -> object:
    try:
        return zipscan.parse_bytes(data)
    except (zipscan.ZipStructureError, zipscan.ZipCorruptError) as e:
        return type(e).__name__, str(e)


@pytest.mark.parametrize("base", ["bundle", "optimizer", "in_place"])
def test_fast_parse_decides_as_the_checked_parse(bases, base, monkeypatch):
    """``_entries_fast`` / ``_covered`` are shortcuts for the common file: on every mutant and fuzzed
    file they give the layout, or the very error, that the entry-by-entry rules give."""
    b = bases[base].read_bytes()
    rng = random.Random(f"zip-fast-{base}")
    files = [b, *_mutants(b).values(), *(_fuzz_one(b, rng) for _ in range(150))]
    taken, bulk = [], []
    real, real_bulk = zipscan._entries_fast, zipscan._locals_bulk
    monkeypatch.setattr(zipscan, "_entries_fast", lambda *a: taken.append(real(*a)) or taken[-1])
    monkeypatch.setattr(zipscan, "_locals_bulk", lambda *a: bulk.append(real_bulk(*a)) or bulk[-1])
    fast = [_outcome(f) for f in files]
    assert taken[0] is not None and sum(t is not None for t in taken) >= 10  # the shortcuts are taken
    assert (True in bulk or base == "in_place") and False in bulk  # (in_place: a dozen records around a gap)
    monkeypatch.setattr(zipscan, "_entries_fast", lambda *a: None)
    monkeypatch.setattr(zipscan, "_covered", lambda *a: False)
    checked = [_outcome(f) for f in files]
    assert fast == checked
    assert isinstance(fast[0], zipscan.ZipLayout) and sum(isinstance(o, tuple) for o in fast) > 20


@pytest.mark.parametrize("base", ["bundle", "optimizer", "in_place"])
def test_central_directory_split_gives_the_walks_columns_or_declines(bases, base):
    """The bulk read of the central directory (one split at the entry signature, strided field
    columns) is a shortcut of the entry-by-entry walk: on the file, its mutants and fuzzed copies it
    gives exactly the walk's columns, or declines."""
    b = bases[base].read_bytes()
    _, _, _, cd_off, cd_size = _tail(b)
    n = len(_cd_entries(b, cd_off, cd_size))
    rng = random.Random(f"central-split-{base}")
    files = [b, *_mutants(b).values(), *(_fuzz_one(b, rng) for _ in range(200))]
    outcomes = []
    for f in files:
        cd = f[cd_off:cd_off + cd_size]
        split = zipscan._central_split(cd, n)
        if split is not None:
            assert split == zipscan._central_walk(cd, n)
        outcomes.append(split is not None)
    assert outcomes[0] and False in outcomes


def test_a_record_name_holding_the_entry_signature_is_read_by_the_walk(tmp_path):
    """A name that holds the central entry's signature splits the directory into more pieces than
    entries: the bulk read declines and the walk reads every name exactly."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"a": torch.arange(4.0)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    p = tmp_path / "sig.pt"
    with zipfile.ZipFile(p, "w") as out:
        for i in src.infolist():
            out.writestr(i.filename, src.read(i))
        out.writestr("archive/extra/PK\x01\x02PK\x01\x02", b"x" * 7)
    b = p.read_bytes()
    eocd = b.rfind(b"PK\x05\x06")
    n, cd_size, cd_off = struct.unpack("<HII", b[eocd + 10:eocd + 20])
    assert zipscan._central_split(b[cd_off:cd_off + cd_size], n) is None
    names = [e.filename for e in parse_zip(str(p)).entries]
    assert names == [i.filename for i in zipfile.ZipFile(p).infolist()]
    assert "archive/extra/PK\x01\x02PK\x01\x02" in names


def test_fast_parse_of_big_records_decides_as_the_checked_parse(tmp_path, monkeypatch):
    """Records too big to read together are checked by one read at each boundary (a data
    descriptor and the next local header side by side): on the file and on mutants of those
    bytes, the same layout or the same error as the entry-by-entry parse."""
    p = tmp_path / "big.pt"
    torch.save({f"w{i}": torch.full((1 << 20,), float(i)) for i in range(4)}, p)
    b = p.read_bytes()
    lay = parse_zip(str(p))
    mutants = [b]
    for e in lay.entries[1:-1]:
        for at in (e.header_offset + 1, e.header_offset + 8, e.header_offset + 30, e.end - 16, e.end - 9, e.end - 2):
            m = bytearray(b)
            m[at] ^= 0x20
            mutants.append(bytes(m))
    bulk = []
    real_bulk = zipscan._locals_bulk
    monkeypatch.setattr(zipscan, "_locals_bulk", lambda *a: bulk.append(real_bulk(*a)) or bulk[-1])
    fast = [_outcome(f) for f in mutants]
    assert bulk[0] is True and isinstance(fast[0], zipscan.ZipLayout)
    assert fast[0].entries == lay.entries and sum(isinstance(o, tuple) for o in fast) > len(mutants) // 2
    monkeypatch.setattr(zipscan, "_entries_fast", lambda *a: None)
    monkeypatch.setattr(zipscan, "_covered", lambda *a: False)
    assert fast == [_outcome(f) for f in mutants]


def test_fast_parse_of_an_edited_many_record_file_decides_as_the_checked_parse(tmp_path, monkeypatch):
    """An in-place edit leaves the old directory between the records the new one lists (and lists
    the new pickle first): the chunks around that gap are halved until they check in bulk, and the
    earlier version's records shared with the current one are not read again. Same layout, or the
    same error on mutants, as the entry-by-entry parse."""
    p = tmp_path / "many.pt"
    params = [torch.nn.Parameter(torch.full((3,), float(i))) for i in range(300)]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sum(q.sum() for q in params).backward()
    opt.step()
    torch.save({"model": {f"w{i}": q.detach() for i, q in enumerate(params)}, "optimizer": opt.state_dict()}, p)
    for lr in ("0.05", "0.02"):
        r = invoke("set", str(p), "--lr", lr, "--in-place")
        assert r.exit_code == 0, r.stderr
    b = p.read_bytes()
    lay = parse_zip(str(p))
    assert len(lay.versions) == 2 and len(lay.entries) > 600
    rng = random.Random("edited")
    files = [b, *(_fuzz_one(b, rng) for _ in range(60))]
    bulk, runs = [], []
    real_bulk, real_run = zipscan._locals_bulk, zipscan._locals_run
    monkeypatch.setattr(zipscan, "_locals_bulk", lambda *a: bulk.append(real_bulk(*a)) or bulk[-1])
    monkeypatch.setattr(zipscan, "_locals_run", lambda *a: runs.append(len(a[2])) or real_run(*a))
    fast = [_outcome(f) for f in files]
    assert isinstance(fast[0], zipscan.ZipLayout) and fast[0].entries == lay.entries
    assert True in bulk and False in bulk
    monkeypatch.setattr(zipscan, "_entries_fast", lambda *a: None)
    monkeypatch.setattr(zipscan, "_covered", lambda *a: False)
    assert fast == [_outcome(f) for f in files]
