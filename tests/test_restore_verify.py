"""``optckpt restore`` verifies before it cuts (issue #27).

It truncates a file only when everything after the noted length is exactly one append written by
optckpt (structure rebuilt byte for byte, record CRCs, the appended bytes' CRC recorded in the end
comment) over a complete torch zip. Forged comments, forged chains, another tool's changes after an
optckpt append and hard-linked files are refused in one line, and the file stays byte-identical."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import ROOT, invoke


def _save(path: Path, seed: int = 0, width: int = 32) -> bytes:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": seed}, path)
    return path.read_bytes()


def _with_comment(data: bytes, comment: bytes) -> bytes:
    """``data`` (a zip ending in an EOCD without comment) with ``comment`` as its EOCD comment."""
    assert data[-22:-18] == b"PK\x05\x06" and data[-2:] == b"\0\0"
    return data[:-2] + struct.pack("<H", len(comment)) + comment


def _refused(p: Path, before: bytes, *, match: str = "nothing changed") -> None:
    for args in (("restore", str(p)), ("restore", str(p), "--dry-run")):
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr
        assert p.read_bytes() == before
    from optckpt.io.append import versions

    assert versions(str(p)) == [len(before)]


def _earlier(p: Path) -> int:
    """The earlier versions ``inspect`` counts; 0 when the zip parser refuses the file outright (a
    forged chain whose "earlier version" is no valid zip chain is an ambiguous structure: refused,
    which counts no version either)."""
    r = invoke("inspect", str(p), "--format", "json")
    if r.exit_code == 2:
        assert "ambiguous zip structure" in r.stderr, r.stderr
        return 0
    assert r.exit_code == 0, r.stderr
    return int(json.loads(r.stdout)["earlier_versions"])


def _plain_zip(seed: int) -> bytes:
    """A small zip without zip64 records (an end record that parses wherever it lies)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02K%d." % seed)
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def _with_inner_zips(p: Path, inner: list[bytes], comment_for) -> int:
    """A torch file that loads, holding ``inner`` zips back to back in one uint8 tensor, each after
    the first with a comment from ``comment_for(length before it)``, and the file itself with
    ``comment_for(end of the last inner zip)``. Returns that end (what the old restore cut to)."""
    clen = len(comment_for(0))
    total = len(inner[0]) + sum(len(z) + clen for z in inner[1:])
    model = torch.nn.Linear(3, 2)
    torch.save({"model": model.state_dict(), "epoch": 1, "blob": torch.zeros(total, dtype=torch.uint8)}, p)
    data = bytearray(p.read_bytes())
    info = next(i for i in zipfile.ZipFile(p).infolist() if i.file_size == total)
    n, e = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    at = start = info.header_offset + 30 + n + e
    for k, z in enumerate(inner):
        piece = z if k == 0 else _with_comment(z, comment_for(at))
        data[at:at + len(piece)] = piece
        at += len(piece)
    assert at == start + total
    p.write_bytes(_with_comment(bytes(data), comment_for(at)))
    assert torch.load(p, weights_only=True)["epoch"] == 1  # it loads: torch checks no tensor CRC
    return at


def test_forged_comment_on_a_never_edited_file_is_refused(tmp_path):
    """A torch file whose comment names, as an earlier version, the end of a zip hidden in a
    tensor (the old restore cut it there, leaving a file that no longer loads): legacy, pending
    and new comment formats, the new one even with the right CRC of the bytes after the cut."""
    from optckpt.io.append import end_state

    inner = _plain_zip(0)
    p = tmp_path / "forged.pt"
    for comment_for in (lambda n: b"optckpt-prev:%020d" % n, lambda n: b"optckpt-pend:%020d" % n,
                        lambda n: b"optckpt-prev:%020d:crc32=%08x" % (n, 0)):
        cut = _with_inner_zips(p, [inner], comment_for)
        data = p.read_bytes()
        fd = os.open(p, os.O_RDONLY)
        try:
            assert end_state(fd, cut) is not None  # what the old restore checked
        finally:
            os.close(fd)
        if comment_for(0).endswith(b"00000000"):  # the CRC a forger would compute
            crc = zlib.crc32(data[cut:len(data) - 22 - 48 - 76])
            data = data[:-8] + b"%08x" % crc
            p.write_bytes(data)
        _refused(p, data)
        assert _earlier(p) == 0


def test_forged_chain_counts_no_version(tmp_path):
    inner = [_plain_zip(i) for i in range(5)]
    p = tmp_path / "chain.pt"
    _with_inner_zips(p, inner, lambda n: b"optckpt-prev:%020d" % n)
    _refused(p, p.read_bytes())
    assert _earlier(p) == 0
    r = invoke("inspect", str(p))
    assert (r.exit_code == 0 and "earlier version" not in r.stdout) or (
        r.exit_code == 2 and "ambiguous zip structure" in r.stderr), r.output


@pytest.fixture
def edited(tmp_path):
    p = tmp_path / "ck.pt"
    original = _save(p)
    r = invoke("set", str(p), "--lr", "0.5", "--in-place")
    assert r.exit_code == 0, r.stderr
    comment = p.read_bytes()[-48:]
    assert re.fullmatch(rb"optckpt-prev:%020d:crc32=[0-9a-f]{8}" % len(original), comment), comment
    assert _earlier(p) == 1
    return p, original


def test_another_tool_appending_after_an_in_place_edit_is_refused(edited):
    """zipfile's append mode writes its record over optckpt's directory and keeps the comment."""
    p, original = edited
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("ck/extra.txt", b"another tool's change")
    assert p.read_bytes()[-48:-40] == b"optckpt-"  # the comment was kept
    _refused(p, p.read_bytes())


def test_a_different_valid_tail_is_refused(edited):
    """The bytes after the cut replaced by another valid torch zip ending in the same comment."""
    p, original = edited
    data = p.read_bytes()
    other = io.BytesIO()
    torch.save({"something": torch.arange(10)}, other)
    p.write_bytes(original + _with_comment(other.getvalue(), data[-48:]))
    _refused(p, p.read_bytes())


def test_bytes_changed_after_the_append_are_refused(edited):
    """A byte of the appended data.pkl changed, with its CRC fixed in the local header and the
    directory too (structurally still an optckpt append): only the recorded CRC tells."""
    p, original = edited
    data = bytearray(p.read_bytes())
    z = zipfile.ZipFile(io.BytesIO(bytes(data)))
    info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    assert info.header_offset >= len(original)
    n, e = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    at = info.header_offset + 30 + n + e
    pkl = bytes(data[at:at + info.file_size])
    new_pkl = pkl.replace(b"epoch", b"epoxh")
    assert new_pkl != pkl
    data[at:at + info.file_size] = new_pkl
    old_crc, new_crc = struct.pack("<I", info.CRC), struct.pack("<I", zlib.crc32(new_pkl))
    data[info.header_offset + 14:info.header_offset + 18] = new_crc
    cd = data.rfind(b"PK\x01\x02" + data[info.header_offset + 4:info.header_offset + 6])
    while cd >= 0 and not data[cd + 46:cd + 46 + len(info.filename)] == info.filename.encode():
        cd = data.rfind(b"PK\x01\x02", 0, cd)
    assert data[cd + 16:cd + 20] == old_crc
    data[cd + 16:cd + 20] = new_crc
    p.write_bytes(bytes(data))
    assert torch.load(p, weights_only=True)["epoxh"] == 0  # a valid file, just not the one optckpt wrote
    _refused(p, bytes(data), match="CRC recorded")


def test_a_flipped_byte_in_an_appended_record_is_refused(edited):
    p, original = edited
    data = bytearray(p.read_bytes())
    data[len(original) + 100] ^= 0x01
    p.write_bytes(bytes(data))
    _refused(p, bytes(data))


def test_hard_linked_file_is_refused(edited):
    p, original = edited
    link = p.with_name("other-name.pt")
    os.link(p, link)
    before = p.read_bytes()
    r = invoke("restore", str(p))
    assert r.exit_code == 2 and "hard links" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert p.read_bytes() == before and link.read_bytes() == before
    os.unlink(link)
    assert invoke("restore", str(p)).exit_code == 0 and p.read_bytes() == original


def test_chain_of_three_edits_restores_step_by_step(tmp_path):
    p = tmp_path / "ck.pt"
    states = [_save(p)]
    for lr in ("0.1", "0.2", "0.3"):
        assert invoke("set", str(p), "--lr", lr, "--in-place").exit_code == 0
        states.append(p.read_bytes())
    assert _earlier(p) == 3
    for k in (3, 2, 1):
        r = invoke("restore", str(p), "--dry-run")
        assert r.exit_code == 0 and f"{k} earlier version(s) kept" in r.stdout, r.output
        r = invoke("restore", str(p))
        assert r.exit_code == 0 and f"{k - 1} earlier version(s) still kept" in r.stdout, r.output
        assert p.read_bytes() == states[k - 1]
        assert _earlier(p) == k - 1
    assert invoke("restore", str(p)).exit_code == 2


def _legacy_append():
    """``append.py`` as it was before the CRC was recorded (commit dd209c3)."""
    try:
        text = subprocess.run(["git", "show", "dd209c3:optckpt/io/append.py"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the pre-CRC append.py is not in this checkout's history")
    # the helpers it imported from records have moved down to readguard (the one-way io package)
    text = text.replace("from .records import _mappings, _offset_in, ",
                        "from .readguard import file_mappings as _mappings, offset_in as _offset_in\n"
                        "from .records import ")
    spec = importlib.util.spec_from_loader("optckpt.io._legacy_append", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "optckpt.io"
    sys.modules[spec.name] = mod  # (dataclasses look their module up while the class is made)
    try:
        exec(compile(text, "legacy_append.py", "exec"), mod.__dict__)
    finally:
        del sys.modules[spec.name]
    return mod


def test_files_appended_before_the_crc_was_recorded(tmp_path):
    """Legacy comments (no CRC): restorable when the structure and every record CRC check out."""
    legacy = _legacy_append()
    p = tmp_path / "ck.pt"
    original = _save(p)
    obj = torch.load(p, weights_only=True, mmap=True)
    obj["epoch"] = 7
    legacy.append_version(str(p), obj, expect_size=len(original))
    del obj
    edited = p.read_bytes()
    assert re.fullmatch(rb"optckpt-prev:\d{20}", edited[-33:])
    assert _earlier(p) == 1
    data = bytearray(edited)
    data[len(original) + 100] ^= 0x01  # a changed byte in the appended records: a record CRC fails
    p.write_bytes(bytes(data))
    _refused(p, bytes(data))
    p.write_bytes(edited)
    assert invoke("set", str(p), "--lr", "0.25", "--in-place").exit_code == 0  # a new-format link on top
    assert _earlier(p) == 2
    for before in (edited, original):
        r = invoke("restore", str(p))
        assert r.exit_code == 0, r.output
        assert p.read_bytes() == before
