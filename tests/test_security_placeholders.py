"""Payloads aimed at the placeholder path: the safe reader turns every global into an inert record,
so nothing the pickle names may be imported, called or given its state. Each payload would create
a marker file if any of it ran; a module on ``sys.path`` writes a marker when imported."""

from __future__ import annotations

import argparse
import struct
import sys
import zipfile

import pytest
import torch
from conftest import FIXTURES, invoke, run_cli

from optckpt.io.safepickle import PickledObject, same
from optckpt.io.torchfile import load_torch_file

SLOT = "@@SLOT@@"


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(func: bytes, *args: bytes) -> bytes:
    return func + b"(" + b"".join(args) + b"tR"


def _getattr(obj: bytes, name: str) -> bytes:
    return _call(_global("builtins", "getattr"), obj, _str(name))


def _payloads(marker: str) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    code = f"open({marker!r}, 'w').close()"
    return {
        "reduce_os_system": _call(_global("os", "system"), _str(cmd)),
        "build_setstate": _global("evilmod", "Evil") + b")\x81" + b"}" + _str("cmd") + _str(cmd) + b"sb",
        "functools_partial": _call(_call(_global("functools", "partial"), _global("os", "system"), _str(cmd))),
        "nested_getattr": _call(_getattr(_getattr(_global("os", "path"), "os"), "system"), _str(cmd)),
        "eval_via_sys_modules": _call(_getattr(_call(_getattr(_global("sys", "modules"), "get"), _str("builtins")),
                                               "eval"), _str(code)),
        "import_marker_module": _global("evilmod", "Thing") + b")\x81",
        "exec_in_newobj_args": _global("evilmod", "Thing") + b"(" + _call(_global("builtins", "exec"), _str(code))
        + b"t\x81",
    }


@pytest.fixture
def evilmod(tmp_path, monkeypatch):
    """A module whose import, and whose classes' ``__setstate__``, write markers."""
    d = tmp_path / "site"
    d.mkdir()
    (d / "evilmod.py").write_text(
        f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n"
        "class Thing:\n    pass\n"
        "class Evil:\n"
        f"    def __setstate__(self, state):\n        open({str(tmp_path / 'SETSTATE')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("evilmod", None)
    yield d
    sys.modules.pop("evilmod", None)


def _args() -> argparse.Namespace:
    return argparse.Namespace(lr=0.1, model="cnn", hostile=SLOT)


def _splice(src, dst, payload: bytes, legacy: bool) -> None:
    """``src`` with the pickled string SLOT replaced by raw opcodes (no memo or offset shifts)."""
    needle = _str(SLOT)
    if legacy:
        data = src.read_bytes()
        assert data.count(needle) >= 1
        dst.write_bytes(data.replace(needle, payload))
        return
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(needle) >= 1
                data = data.replace(needle, payload)
            zout.writestr(info.filename, data)


def _hostile(tmp_path, marker: str) -> dict[str, object]:
    good = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    files = {}
    for legacy in (False, True):
        for where in ("top", "in_args"):
            clean = tmp_path / f"clean_{where}_{legacy}.pt"
            obj = {**good, "args": _args()} if where == "in_args" else {**good, "x": SLOT}
            torch.save(obj, clean, _use_new_zipfile_serialization=not legacy)
            for name, payload in _payloads(marker).items():
                path = tmp_path / f"{name}_{where}{'_legacy' if legacy else ''}.pt"
                _splice(clean, path, payload, legacy)
                files[path.name] = path
    return files


def _commands(p: str, tmp_path) -> list[list[str]]:
    target = str(FIXTURES / "models.py") + ":build_cnn"
    o = str(tmp_path / "out.pt")
    bundle = str(FIXTURES / "bundle.pt")
    return [["inspect", p], ["inspect", p, "--stats", "--format", "json"], ["check", p, "--target", target],
            ["remap", p, "--target", target, "-o", o], ["reset", p, "--params", "*", "-o", o],
            ["set", p, "--scale-lr", "0.5", "-o", o], ["diff", p, bundle], ["diff", bundle, p],
            ["convert", p, "--to", "torch", "-o", o], ["check", bundle, "--target", p]]


def _nothing_ran(tmp_path) -> bool:
    return not any((tmp_path / m).exists() for m in ("PWNED", "IMPORTED", "SETSTATE")) and "evilmod" not in sys.modules


def test_placeholder_payloads_never_run(tmp_path, evilmod):
    marker = str(tmp_path / "PWNED")
    files = _hostile(tmp_path, marker)
    assert len(files) == 28
    tried = worked = 0
    for name, path in files.items():
        original = load_torch_file(str(path)).obj
        assert _nothing_ran(tmp_path), name
        for cmd in _commands(str(path), tmp_path):
            r = invoke(*cmd)
            tried += 1
            assert _nothing_ran(tmp_path), (name, cmd)
            assert r.exit_code in (0, 1, 2), (name, cmd, r.stderr)
            if r.exit_code == 2:
                assert r.stderr.startswith("optckpt: error:") and len(r.stderr.strip().splitlines()) == 1
                assert "unexpected" not in r.stderr and "verification failed" not in r.stderr, (name, cmd, r.stderr)
            else:
                worked += 1
            out = tmp_path / "out.pt"
            if out.exists():
                got = load_torch_file(str(out)).obj
                assert _nothing_ran(tmp_path), (name, cmd)
                if cmd[0] != "convert":  # the payload is carried back exactly as it was read, still unrun
                    key = "args" if "in_args" in name else "x"
                    assert same(got[key], original[key]), (name, cmd)
                out.unlink()
    assert tried == 280 and worked >= 200  # the state around the payloads stays usable


def test_payloads_are_shown_for_what_they_are(tmp_path, evilmod):
    marker = str(tmp_path / "PWNED")
    files = _hostile(tmp_path, marker)
    r = invoke("inspect", str(files["reduce_os_system_top.pt"]))
    assert r.exit_code == 0 and "pickled call os.system" in r.stdout and "os.system('touch /" in r.stdout
    r = invoke("inspect", str(files["eval_via_sys_modules_top.pt"]))
    assert "builtins.getattr" in r.stdout and _nothing_ran(tmp_path)
    obj = load_torch_file(str(files["build_setstate_in_args.pt"])).obj["args"]
    evil = obj.state["hostile"]
    assert isinstance(evil, PickledObject) and evil.type_name == "evilmod.Evil" and evil.state == {
        "cmd": f"touch {marker}"}
    assert _nothing_ran(tmp_path)


def test_real_process_never_imports_the_named_module(tmp_path, evilmod):
    """A real subprocess with the module importable: inspect, remap and diff leave no marker."""
    import os

    files = _hostile(tmp_path, str(tmp_path / "PWNED"))
    env_path = os.pathsep.join([str(evilmod), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"], old = env_path, os.environ.get("PYTHONPATH")
    try:
        p = str(files["build_setstate_in_args.pt"])
        for cmd in (["inspect", p], ["remap", p, "--target", str(FIXTURES / "models.py") + ":build_cnn", "-o",
                                     str(tmp_path / "o.pt")], ["diff", p, str(tmp_path / "o.pt")]):
            r = run_cli(*cmd)
            assert r.returncode in (0, 1), r.stderr
        assert not any((tmp_path / m).exists() for m in ("PWNED", "IMPORTED", "SETSTATE"))
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def test_trust_pickle_error_says_what_would_run(tmp_path):
    """A file the safe reader cannot stand in for (a payload as a tensor's storage type): refused,
    naming what full pickle would import and call."""
    clean = tmp_path / "clean.pt"
    torch.save({"model": {"w": torch.ones(2)}, "x": SLOT}, clean)
    bad = tmp_path / "bad.pt"
    payload = _call(_global("torch._utils", "_rebuild_tensor_v2"), _call(_global("os", "system"), _str("true")),
                    b"K\x00", b"K\x01\x85", b"K\x01\x85", b"\x89", _global("collections", "OrderedDict") + b")R")
    _splice(clean, bad, payload, legacy=False)
    r = invoke("inspect", str(bad))
    assert r.exit_code == 2 and "--trust-pickle" in r.stderr and "os.system" in r.stderr
    assert "Nothing was executed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
