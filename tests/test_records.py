"""The record-level rewrite: storage records copied byte for byte, a new pickle, a valid zip."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from conftest import FIXTURES, invoke

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
