"""Where writes may land: never through a symlinked backup, never into a device or FIFO, never
over an unrelated temp file, never an unverified file at the final path, whatever the command."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
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


def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optckpt: error:"), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def _remap(src, *extra):
    return invoke("remap", str(src), "--model", str(SEED_MODEL), "--target", MODEL2, *extra)


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "opt.pth"
    shutil.copy(SEED_OPT, p)
    return p


def test_in_place_never_follows_a_symlinked_backup(src, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, str(src) + ".bak")
    _one_line_error(_remap(src, "--in-place", "--backup"), "previous backup")
    assert victim.read_text() == "precious" and _sha(src) == _sha(SEED_OPT)
    _one_line_error(_remap(src, "--in-place", "--backup", "--replace-backup"), "not a regular file")
    assert victim.read_text() == "precious" and _sha(src) == _sha(SEED_OPT)
    assert _remap(src, "--in-place").exit_code == 0  # appending keeps no .bak: the link is not touched
    assert victim.read_text() == "precious" and os.path.islink(str(src) + ".bak")


def test_existing_backup_is_refused_unless_asked(src):
    bak = Path(str(src) + ".bak")
    bak.write_bytes(b"an older backup")
    _one_line_error(_remap(src, "--in-place", "--backup"), "--replace-backup")
    assert bak.read_bytes() == b"an older backup" and _sha(src) == _sha(SEED_OPT)
    r = _remap(src, "--in-place", "--backup", "--replace-backup")
    assert r.exit_code == 0, r.stderr
    assert _sha(bak) == _sha(SEED_OPT)


def _legacy(path: Path) -> None:
    torch.save(torch.load(SEED_OPT, weights_only=True), path, _use_new_zipfile_serialization=False)


def test_legacy_file_backup_is_a_hard_link_not_a_copy(tmp_path):
    src = tmp_path / "opt.pth"
    _legacy(src)
    before = _sha(src)
    ino = os.stat(src).st_ino
    assert _remap(src, "--in-place").exit_code == 0
    assert os.stat(str(src) + ".bak").st_ino == ino  # the original inode: no bytes copied, none half-written
    assert os.stat(src).st_ino != ino and os.stat(src).st_nlink == 1 and _sha(str(src) + ".bak") == before


def test_zip_file_in_place_keeps_its_inode_and_old_bytes(src):
    ino, old = os.stat(src).st_ino, src.read_bytes()
    assert _remap(src, "--in-place").exit_code == 0
    assert os.stat(src).st_ino == ino and src.read_bytes()[:len(old)] == old
    assert not os.path.lexists(str(src) + ".bak")


def test_hard_linked_input_is_not_silently_split(src, tmp_path):
    other = tmp_path / "other-name.pth"
    os.link(src, other)
    _one_line_error(_remap(src, "--in-place"), "hard links")
    assert _sha(src) == _sha(other) == _sha(SEED_OPT)


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink"])
def test_output_onto_special_files_is_refused(src, tmp_path, kind):
    if kind == "fifo":
        out = tmp_path / "out.pth"
        os.mkfifo(out)
    elif kind == "device":
        out = Path("/dev/null")
    else:
        target = tmp_path / "elsewhere.pth"
        target.write_bytes(b"keep")
        out = tmp_path / "out.pth"
        os.symlink(target, out)
    for cmd in (["remap", str(src), "--model", str(SEED_MODEL), "--target", MODEL2, "-o", str(out)],
                ["set", str(src), "--scale-lr", "0.5", "-o", str(out)],
                ["reset", str(src), "--model", str(SEED_MODEL), "--params", "*", "-o", str(out)]):
        _one_line_error(invoke(*cmd))
    if kind == "fifo":
        assert Path(out).is_fifo()
    elif kind == "device":
        assert Path("/dev/null").is_char_device()
    else:
        assert out.is_symlink() and target.read_bytes() == b"keep"


def test_convert_never_touches_an_existing_tmp_name(tmp_path):
    out = tmp_path / "weights"
    (tmp_path / "weights.tmp").write_bytes(b"someone's file")
    (tmp_path / "w.pt.tmp").mkdir()
    (tmp_path / "w.pt.tmp" / "keep").write_text("x")
    assert invoke("convert", str(FIXTURES / "bundle.pt"), "--to", "dcp", "-o", str(out)).exit_code == 0
    assert invoke("convert", str(FIXTURES / "bundle.pt"), "--to", "torch", "-o", str(tmp_path / "w.pt")).exit_code == 0
    assert (tmp_path / "weights.tmp").read_bytes() == b"someone's file"
    assert sorted(os.listdir(tmp_path / "w.pt.tmp")) == ["keep"]
    assert sorted(os.listdir(out)) == sorted(p for p in os.listdir(out) if not p.endswith(".tmp"))
    assert optckpt.load(out).layout == "dcp" and optckpt.load(tmp_path / "w.pt").optimizers


def test_convert_modes_follow_the_input(tmp_path):
    src = tmp_path / "in.pt"
    shutil.copy(FIXTURES / "bundle.pt", src)
    os.chmod(src, 0o644)
    for to, name in (("torch", "o.pt"), ("safetensors", "o.safetensors"), ("dcp", "o.dcp")):
        assert invoke("convert", str(src), "--to", to, "-o", str(tmp_path / name)).exit_code == 0
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, to


def test_concurrent_converts_end_with_one_verified_result(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for trial in range(3):
        out = tmp_path / f"same{trial}"
        procs = [subprocess.Popen([sys.executable, "-m", "optckpt", "convert", str(FIXTURES / "bundle.pt"), "--to",
                                   "dcp", "-o", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        assert sorted(rc for rc, _ in results)[0] == 0, results
        for rc, err in results:
            assert rc in (0, 2), err
            if rc == 2:
                assert len(err.strip().splitlines()) == 1 and ("exists" in err or "appeared" in err), err
        ck = optckpt.load(out)
        want = torch.load(FIXTURES / "bundle.pt", weights_only=True)["model"]
        assert all(torch.equal(ck.models[0].tensors[k], v) for k, v in want.items())
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_failed_verification_leaves_nothing(src, tmp_path, monkeypatch):
    monkeypatch.setattr("optckpt.verify.same_bits", lambda *a: False)  # fault injection: the re-read "differs"
    out = tmp_path / "out.pth"
    _one_line_error(_remap(src, "-o", str(out)), "verification failed")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["opt.pth"]
    _one_line_error(_remap(src, "--in-place"), "verification failed")  # appended, read back, rolled back
    assert _sha(src) == _sha(SEED_OPT) and sorted(os.listdir(tmp_path)) == ["opt.pth"]
    _one_line_error(_remap(src, "--in-place", "--backup"), "verification failed")
    assert _sha(src) == _sha(SEED_OPT) and sorted(os.listdir(tmp_path)) == ["opt.pth"]  # no .bak of a failed edit
    _one_line_error(invoke("convert", str(FIXTURES / "bundle.pt"), "--to", "dcp", "-o", str(tmp_path / "d")))
    assert sorted(os.listdir(tmp_path)) == ["opt.pth"]


def _needs_trust(path: Path) -> None:
    """A timm / torchvision-reference style file: the training args pickled as a Namespace."""
    ck = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    ck["args"] = argparse.Namespace(lr=0.1, model="cnn", epochs=3)
    torch.save(ck, path)


@pytest.mark.parametrize("cmd", [["remap", "--target", str(FIXTURES / "models.py") + ":build_cnn"],
                                 ["set", "--scale-lr", "0.5"], ["reset", "--params", "*"]])
def test_trusted_edits_verify_with_the_same_trust(tmp_path, cmd):
    src = tmp_path / "last.pth.tar"
    _needs_trust(src)
    out = tmp_path / "out.pth.tar"
    r = invoke(cmd[0], str(src), *cmd[1:], "--trust-pickle", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    back = torch.load(out, weights_only=False)
    assert back["args"] == argparse.Namespace(lr=0.1, model="cnn", epochs=3)


def test_stale_temp_files_are_named_on_the_next_run(src, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.pth.optckpt-{pid}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    r = _remap(src, "-o", str(tmp_path / "out.pth"))
    assert r.exit_code == 0, r.stderr
    assert "interrupted earlier run" in r.stderr and str(stale) in r.stderr
    assert stale.exists()  # named, not deleted behind the user's back


def test_long_output_names_work(src, tmp_path):
    out = tmp_path / ("x" * 240 + ".pth")
    r = _remap(src, "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert out.exists()


def test_directory_symlinks_are_never_followed(tmp_path):
    d = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"x" * 1000)
    os.symlink(outside, d / "linked_dir")
    os.mkfifo(d / "a_fifo")
    out = tmp_path / "out"
    r = invoke("set", str(d), "--scale-lr", "0.5", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert (out / "linked_dir").is_symlink() and os.readlink(out / "linked_dir") == str(outside)
    assert not (out / "a_fifo").exists()
    assert os.stat(out).st_mode & 0o777 == os.stat(d).st_mode & 0o777


def test_json_stays_clean_when_the_target_prints(tmp_path):
    noisy = tmp_path / "noisy.py"
    noisy.write_text(
        "import logging, sys\n"
        "print('importing the model zoo')\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO)\n"
        "logging.getLogger('zoo').info('registered 3 models')\n"
        "import torch\n"
        "class Model2(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.linear2 = torch.nn.Linear(3, 2)\n"
        "        self.linear1 = torch.nn.Linear(2, 3)\n"
        "def build():\n"
        "    print('building')\n"
        "    logging.getLogger('zoo').info('built')\n"
        "    return Model2()\n")
    r = invoke("check", str(SEED_OPT), "--model", str(SEED_MODEL), "--target", f"{noisy}:build", "--format", "json")
    assert r.exit_code == 1, r.stderr
    rep = json.loads(r.stdout)
    assert rep["counts"]["moved"] == 4
    assert "building" in r.stderr


def test_diff_sees_equal_tensors_at_any_alignment(tmp_path):
    """Regression: records inside a safetensors file sit at 4-byte offsets; equal tensors compared
    as int64 words on one side and int32 words on the other looked different."""
    st = tmp_path / "m.safetensors"
    assert invoke("convert", str(FIXTURES / "bundle.pt"), "--to", "safetensors", "-o", str(st)).exit_code == 0
    r = invoke("diff", str(FIXTURES / "bundle.pt"), str(st), "--only", "model", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["identical"], r.stdout


def test_paths_and_names_are_printed_escaped_on_one_line(tmp_path):
    odd = tmp_path / "new\nline\x1b[31m.pt"
    r = invoke("inspect", str(odd))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "\x1b" not in r.stderr, r.stderr
    assert "\\x0a" in r.stderr
    sd = {"\x1b[2Jevil\nname": torch.ones(2), "ok": torch.ones(1)}
    torch.save({"model": sd}, tmp_path / "names.pt")
    r = invoke("inspect", str(tmp_path / "names.pt"))
    assert r.exit_code == 0 and "\x1b" not in r.stdout and "\\x1b[2Jevil\\x0aname" in r.stdout, r.stdout
    js = json.loads(invoke("inspect", str(tmp_path / "names.pt"), "--format", "json").stdout)
    assert js["models"][0]["tensors"][0]["name"] == "\x1b[2Jevil\nname"  # JSON keeps the real name
