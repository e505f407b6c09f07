"""The record-level rewrite: storage records copied byte for byte, a new pickle, a valid zip."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from conftest import FIXTURES, invoke
from hypothesis import given, settings
from hypothesis import strategies as st

import optckpt
from optckpt.io import records

MODEL2 = str(FIXTURES / "models.py") + ":build_model2"


def _remap_without_torch_save(tmp_path, monkeypatch, src, *args):
    def refuse(*a, **k):
        raise AssertionError("torch.save was used: the record-level rewrite did not apply")

    monkeypatch.setattr(torch, "save", refuse)
    out = tmp_path / "out.pt"
    r = invoke("remap", str(src), *args, "-o", str(out))
    monkeypatch.undo()
    assert r.exit_code == 0, r.stdout + r.stderr
    return out


def test_remap_copies_records_and_is_a_valid_checkpoint(tmp_path, monkeypatch):
    out = _remap_without_torch_save(tmp_path, monkeypatch, FIXTURES / "bundle.pt", "--target",
                                    str(FIXTURES / "models.py") + ":build_cnn_head_first")
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every CRC right
        names = z.namelist()
    assert names[0].endswith("data.pkl") and names[-1].endswith(".data/serialization_id")
    before = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    after = torch.load(out, weights_only=True, mmap=True)
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    assert after["epoch"] == before["epoch"]
    # the moved moments are the old ones, under their new indices
    assert torch.equal(after["optimizer"]["state"][0]["exp_avg"], before["optimizer"]["state"][6]["exp_avg"])
    with zipfile.ZipFile(out) as z, open(out, "rb") as f:
        for info in z.infolist():  # 64-byte aligned data, as torch writes it (mmap needs it)
            f.seek(info.header_offset + 26)
            n, e = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            assert (info.header_offset + 30 + n + e) % 64 == 0


def test_new_storages_are_written_from_memory(tmp_path, monkeypatch):
    """reset --mode zero creates new tensors: those are written from memory, the rest copied."""
    out = tmp_path / "z.pt"
    r = invoke("reset", str(FIXTURES / "bundle.pt"), "--params", "classifier.*", "--mode", "zero", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    st = torch.load(out, weights_only=True)["optimizer"]["state"]
    assert float(st[6]["exp_avg"].abs().sum()) == 0 and float(st[0]["exp_avg"].abs().sum()) > 0


def test_zip64_records(tmp_path, monkeypatch):
    """Force the zip64 layout (as for checkpoints over 4 GiB) on a small file: torch still reads it."""
    monkeypatch.setattr(records, "_Z64_LIMIT", 256)
    ck = optckpt.load(FIXTURES / "seed" / "optimizer_0.pth")
    obj = ck.parts[0].obj
    out = tmp_path / "z64.pth"
    assert records.rewrite_records(str(FIXTURES / "seed" / "optimizer_0.pth"), obj, str(out))
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    got = torch.load(out, weights_only=True, mmap=True)
    want = torch.load(FIXTURES / "seed" / "optimizer_0.pth", weights_only=True)
    assert got["param_groups"] == want["param_groups"]
    for i, entry in want["state"].items():
        for k, v in entry.items():
            assert torch.equal(got["state"][i][k], v)


def test_declines_legacy_and_unmapped_inputs(tmp_path):
    sd = {"w": torch.ones(3)}
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert not records.rewrite_records(str(tmp_path / "legacy.pt"), sd, str(tmp_path / "x.pt"))
    torch.save(sd, tmp_path / "z.pt")
    assert not records.rewrite_records(str(tmp_path / "z.pt"), sd, str(tmp_path / "y.pt"))  # not mapped here
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


@pytest.mark.parametrize("cmd", ["set", "remap"])
def test_directory_parts_use_it_too(tmp_path, monkeypatch, cmd):
    pytest.importorskip("transformers")
    src = FIXTURES / "hf_trainer" / "checkpoint-3"
    args = ["--scale-lr", "0.5"] if cmd == "set" else ["--target", str(src)]

    def refuse(*a, **k):
        raise AssertionError("torch.save was used")

    monkeypatch.setattr(torch, "save", refuse)
    r = invoke(cmd, str(src), *args, "-o", str(tmp_path / "out"))
    monkeypatch.undo()
    assert r.exit_code == 0, r.stderr
    rep = json.loads(invoke("inspect", str(tmp_path / "out"), "--format", "json").stdout)
    assert rep["optimizers"][0]["num_with_state"] == 28


def _data_records(path):
    with zipfile.ZipFile(path) as z:
        return [i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith("serialization_id")]


def test_adjacent_records_are_copied_in_one_piece(tmp_path, monkeypatch):
    """Records that follow one another in the source are copied with one copy (their local headers
    and data descriptors with them): far fewer copies than records, every record's data still
    64-byte aligned, the zip valid, torch reads the same tensors."""
    calls = []
    real = records._copy_range
    monkeypatch.setattr(records, "_copy_range", lambda *a: (calls.append(a[-1]), real(*a))[1])
    out = tmp_path / "out.pt"
    optckpt.set_hparams(str(FIXTURES / "bundle.pt"), str(out), lr=0.1)
    n = len(_data_records(FIXTURES / "bundle.pt"))
    assert n >= 4 and len(calls) < n / 2
    with zipfile.ZipFile(out) as z, open(out, "rb") as f:
        assert z.testzip() is None
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            nl, el = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            assert (info.header_offset + 30 + nl + el) % 64 == 0
    before = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    after = torch.load(out, weights_only=True, mmap=True)
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    assert all(torch.equal(after["optimizer"]["state"][i][m], s[m])
               for i, s in before["optimizer"]["state"].items() for m in s if torch.is_tensor(s[m]))


def test_a_byte_wrong_inside_a_copied_run_fails_the_verification(tmp_path, monkeypatch):
    """One data byte of the last record of a run copied in one piece differs from the source: the
    verification (one comparison of the whole run, then record by record) catches it; nothing is
    written."""
    import os

    from optckpt.errors import WriteError

    src = FIXTURES / "bundle.pt"
    victim = max((i for i in _data_records(src) if i.file_size >= 8), key=lambda i: i.header_offset)
    with open(src, "rb") as f:
        f.seek(victim.header_offset + 26)
        nl, el = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    at = victim.header_offset + 30 + nl + el + victim.file_size // 2  # a byte in the middle of its data
    hit = []
    real = records._copy_range

    def corrupting(src_fd, dst_fd, src_off, dst_off, size):
        real(src_fd, dst_fd, src_off, dst_off, size)
        if src_off < at < src_off + size and src_off < victim.header_offset:  # (inside a run, not its own copy)
            hit.append(at)
            byte = os.pread(src_fd, 1, at)
            os.pwrite(dst_fd, bytes([byte[0] ^ 0x01]), dst_off + at - src_off)

    monkeypatch.setattr(records, "_copy_range", corrupting)
    out = tmp_path / "out.pt"
    with pytest.raises(WriteError, match="verification failed"):
        optckpt.set_hparams(str(src), str(out), lr=0.1)
    assert hit and not out.exists() and os.listdir(tmp_path) == []


def test_a_failed_edit_leaves_an_existing_output_as_it_was(tmp_path, monkeypatch):
    """The output path already holds a file (the writer drops its cached pages while writing, a
    hint): an edit whose copy is wrong fails and that file is byte for byte what it was, the only
    file there."""
    import hashlib
    import os

    from optckpt.errors import WriteError

    out = tmp_path / "out.pt"
    out.write_bytes(b"an earlier output\n" * 4096)
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    real = records._copy_range

    def corrupting(src_fd, dst_fd, src_off, dst_off, size):
        real(src_fd, dst_fd, src_off, dst_off, size)
        byte = os.pread(dst_fd, 1, dst_off + size - 1)
        os.pwrite(dst_fd, bytes([byte[0] ^ 0x01]), dst_off + size - 1)

    monkeypatch.setattr(records, "_copy_range", corrupting)
    with pytest.raises(WriteError, match="verification failed"):
        optckpt.set_hparams(str(FIXTURES / "bundle.pt"), str(out), lr=0.1)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before and os.listdir(tmp_path) == ["out.pt"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 10**12).map(str), st.integers(0, 999).map(lambda i: f"{i:04d}"),
                          st.text("0123456789²٣abc_", min_size=1, max_size=6))))
def test_record_order_is_numeric_keys_by_value_then_the_others(keys: list[str]) -> None:
    """Records in torch's order: keys of ASCII digits by value (equal values as strings), then every
    other key as a string (a Unicode digit such as '²' among them: it is no record number)."""
    from optckpt.io.records import record_order

    def numeric(k: str) -> bool:
        return all("0" <= c <= "9" for c in k)

    want = sorted((k for k in keys if numeric(k)), key=lambda k: (int(k), k))
    want += sorted(k for k in keys if not numeric(k))
    assert record_order(keys) == want
    assert record_order(set(keys)) == [k for k in dict.fromkeys(want) if k in set(keys)]
