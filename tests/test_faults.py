"""Faults while writing: the input is never damaged and no partial file sits at the final path.

Real faults where this machine allows them (a full tmpfs for ENOSPC, a read-only mount, SIGKILL of a
real subprocess, another user's permissions), injected OSErrors otherwise."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT, invoke

import optckpt

SEED_OPT = FIXTURES / "seed" / "optimizer_0.pth"
SEED_MODEL = FIXTURES / "seed" / "model_0.pth"
MODEL2 = str(FIXTURES / "models.py") + ":build_model2"


def _sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _one_line_error(r) -> None:
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optckpt: error:"), r.stderr


def _leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(n for n in os.listdir(d) if n not in keep)


@pytest.fixture
def tmpfs(tmp_path):
    """A 256 KB tmpfs (root only): real ENOSPC / EROFS."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _big_checkpoint(path: Path, mb: int = 96) -> None:
    n = mb * (1 << 20) // 4 // 3
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(n, generator=g))
    b = torch.nn.Parameter(torch.randn(8, generator=g))
    opt = torch.optim.Adam([w, b])
    (w.sum() + b.sum()).backward()
    opt.step()
    torch.save({"model": {"w": w.detach(), "b": b.detach()}, "optimizer": opt.state_dict()}, path)


def test_enospc_real_full_disk(tmpfs, tmp_path):
    src = tmp_path / "big.pt"
    _big_checkpoint(src, mb=2)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["b", "w"]))
    before = _sha(src)
    r = invoke("remap", str(src), "--target", str(names), "-o", str(tmpfs / "out.pt"))
    _one_line_error(r)
    assert "No space left" in r.stderr or "space" in r.stderr.lower()
    assert _sha(src) == before
    assert os.listdir(tmpfs) == []  # no partial file, no temp file left


def test_read_only_output_real_mount(tmpfs, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    r = invoke("remap", str(SEED_OPT), "--model", str(SEED_MODEL), "--target", MODEL2, "-o", str(tmpfs / "o.pth"))
    _one_line_error(r)
    assert "read-only" in r.stderr.lower() or "cannot" in r.stderr.lower()


def test_permission_denied_as_another_user(tmp_path, request):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as another user")
    # a directory of its own under /tmp: pytest makes its basetemp private again whenever another pytest
    # process starts, which would turn this into a read error
    top = Path(tempfile.mkdtemp(prefix="optckpt-otheruser-", dir="/tmp"))
    request.addfinalizer(lambda: (os.chmod(top / "ro", 0o755), shutil.rmtree(top, ignore_errors=True)))
    os.chmod(top, 0o755)
    d = top / "ro"
    d.mkdir()
    shutil.copy(SEED_OPT, d / "opt.pth")
    os.chmod(d / "opt.pth", 0o644)
    os.chmod(d, 0o555)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(tmp_path))
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "optckpt",
           "remap", str(d / "opt.pth"), "--model", str(SEED_MODEL), "--target", MODEL2, "--in-place"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=120)
    if "No module named" in r.stderr or "Permission denied: '/work" in r.stderr:
        pytest.skip("the other user cannot read the interpreter here")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not writable" in r.stderr
    assert _sha(d / "opt.pth") == _sha(SEED_OPT) and sorted(os.listdir(d)) == ["opt.pth"]


@pytest.mark.parametrize("where", ["torch.save", "record-copy", "fsync", "replace"])
def test_injected_eio_leaves_nothing(tmp_path, monkeypatch, where):
    src = tmp_path / "opt.pth"
    shutil.copy(SEED_OPT, src)
    out = tmp_path / "out.pth"
    err = OSError(errno.EIO, "Input/output error")

    def boom(*a, **k):
        raise err

    if where == "torch.save":  # the general path (the record-level rewrite declined)
        def partial_save(obj, f, *a, **k):
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 partial")
            raise err

        monkeypatch.setattr("optckpt.io.write.rewrite_records", lambda *a: False)
        monkeypatch.setattr(torch, "save", partial_save)
    elif where == "record-copy":  # the record-level rewrite, mid-copy
        monkeypatch.setattr("optckpt.io.records._copy_range", boom)
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    r = invoke("remap", str(src), "--model", str(SEED_MODEL), "--target", MODEL2, "-o", str(out))
    _one_line_error(r)
    assert "Input/output error" in r.stderr
    assert _sha(src) == _sha(SEED_OPT)
    assert _leftovers(tmp_path, {"opt.pth"}) == []


def test_injected_enospc_in_directory_layout(tmp_path, monkeypatch):
    src = FIXTURES / "hf_trainer" / "checkpoint-3"
    before = {n: _sha(src / n) for n in os.listdir(src)}
    real_copy = shutil.copy2
    calls = {"n": 0}

    def flaky_copy(a, b, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(a, b, **k)

    monkeypatch.setattr(shutil, "copy2", flaky_copy)
    r = invoke("remap", str(src), "--target", str(src), "-o", str(tmp_path / "out"))
    _one_line_error(r)
    assert {n: _sha(src / n) for n in os.listdir(src)} == before
    assert os.listdir(tmp_path) == []  # the temp directory is gone too


def test_symlinked_input_in_place_keeps_the_link(tmp_path):
    real = tmp_path / "real.pth"
    shutil.copy(SEED_OPT, real)
    link = tmp_path / "link.pth"
    link.symlink_to(real)
    r = invoke("remap", str(link), "--model", str(SEED_MODEL), "--target", MODEL2, "--in-place")
    assert r.exit_code == 0, r.stderr
    assert link.is_symlink() and os.path.samefile(link, real)
    assert not (tmp_path / "real.pth.bak").exists()  # appended to the real file, the link kept
    assert torch.load(real, weights_only=True)["param_groups"][0]["param_names"][0] == "linear2.weight"
    r = invoke("remap", str(link), "--model", str(SEED_MODEL), "--target", MODEL2, "-o", str(real))
    _one_line_error(r)  # the output is the input, through the link


def test_file_mode_preserved(tmp_path):
    src = tmp_path / "opt.pth"
    shutil.copy(SEED_OPT, src)
    os.chmod(src, 0o640)
    out = tmp_path / "out.pth"
    assert invoke("remap", str(src), "--model", str(SEED_MODEL), "--target", MODEL2, "-o", str(out)).exit_code == 0
    assert os.stat(out).st_mode & 0o777 == 0o640


@pytest.mark.parametrize("kills", [2, pytest.param(6, marks=pytest.mark.slow)])
def test_sigkill_at_random_points(tmp_path, kills):
    """Kill a real remap of a ~96 MB checkpoint at random moments: the input is intact, and whatever
    is at the final path is a complete, verified checkpoint (or nothing). 2 kills in the default run,
    6 with ``-m slow``."""
    src = tmp_path / "big.pt"
    _big_checkpoint(src)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["b", "w"]))
    before = _sha(src)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "optckpt", "remap", str(src), "--target", str(names)]
    t0 = time.monotonic()
    done = subprocess.run([*cmd, "-o", str(tmp_path / "full.pt")], env=env, capture_output=True, cwd=ROOT)
    total = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    rng = random.Random(0)
    survived = 0
    for k in range(kills):
        out = tmp_path / f"out{k}.pt"
        p = subprocess.Popen([*cmd, "-o", str(out)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.0) * total)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert _sha(src) == before
        if out.exists():  # the rename happened: the file must be whole
            ck = optckpt.load(out)
            assert ck.optimizer().state[1]["exp_avg"].shape == ck.models[0].meta["w"].shape
        survived += 1
    assert survived == kills
