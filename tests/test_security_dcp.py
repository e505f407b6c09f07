"""Hostile DCP directories: dotted-name gadgets through every ``torch.distributed.checkpoint``
module, payloads placed before genuine metadata, shard paths that leave the directory, FIFOs.
Each payload creates a marker file if it ever runs; none may, under any command."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import pkgutil
import shutil
import struct
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import FIXTURES, invoke
from models_zoo import TinyGPT, gpt_loss
from torch.distributed.checkpoint.state_dict import get_state_dict


def _unicode(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + struct.pack("<B", len(b)) + b if len(b) < 256 else b"X" + struct.pack("<I", len(b)) + b


def gadget(module: str, name: str, arg: str) -> bytes:
    """Opcodes that resolve ``module``/``name`` with STACK_GLOBAL, call it with ``arg`` and POP the
    result: prefixed to genuine metadata, the rest of the file still unpickles to real metadata."""
    return _unicode(module) + _unicode(name) + b"\x93" + _unicode(arg) + b"\x85R0"


def _dcp_modules() -> list[str]:
    names = ["torch.distributed.checkpoint"]
    for m in pkgutil.walk_packages(dcp.__path__, "torch.distributed.checkpoint."):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(m.name)
        except Exception:
            continue
        names.append(m.name)
    return names


def _reachable_gadgets(marker: str) -> list[tuple[str, str, str]]:
    """(module, dotted name, argument) triples that plain pickle would resolve to something that
    runs a command or code: found by walking each DCP module's globals, as an attacker would."""
    out = []
    cmd = f"touch {marker}"
    code = f"open({marker!r}, 'w').close()"
    for mod_name in _dcp_modules():
        mod = importlib.import_module(mod_name)
        g = vars(mod)
        if "os" in g:
            out.append((mod_name, "os.system", cmd))
        if "subprocess" in g:
            out.append((mod_name, "subprocess.getoutput", cmd))
        if "sys" in g:
            out.append((mod_name, "sys.modules.get", "os"))  # a lookup, harmless itself, still refused
        if "pickle" in g:
            out.append((mod_name, "pickle.loads", "x"))
        if "torch" in g:
            out.append((mod_name, "torch.load", marker))
        if "functools" in g:
            out.append((mod_name, "functools.partial", "x"))
        if "builtins" in g:
            out.append((mod_name, "builtins.exec", code))
    out.append(("torch.distributed.checkpoint.format_utils", "torch_save_to_dcp", marker))
    out.append(("builtins", "eval", code))
    out.append(("os", "system", cmd))
    return out


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    torch.manual_seed(0)
    m = TinyGPT(n_layer=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gpt_loss(m, 0).backward()
    opt.step()
    msd, osd = get_state_dict(m, opt)
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optimizer": osd, "extra": {"step": 1}}, checkpoint_id=str(path), no_dist=True)
    return path


def _commands(d: str, tmp_path) -> list[list[str]]:
    target = str(FIXTURES / "models.py") + ":build_cnn"
    out = str(tmp_path / "out")
    return [
        ["inspect", d], ["inspect", d, "--stats", "--format", "json"], ["check", d, "--target", target],
        ["remap", d, "--target", target, "-o", out], ["set", d, "--scale-lr", "0.5", "-o", out],
        ["reset", d, "--params", "*", "-o", out], ["diff", d, d, "--format", "json"],
        ["convert", d, "--to", "torch", "-o", out], ["check", str(FIXTURES / "bundle.pt"), "--target", d],
    ]


def _assert_refused(r, marker, what):
    assert not os.path.exists(marker), what
    assert r.exit_code == 2, (what, r.stdout, r.stderr)
    assert r.stderr.startswith("optckpt: error:") and len(r.stderr.strip().splitlines()) == 1, (what, r.stderr)


def test_the_payloads_are_real(genuine, tmp_path):
    """Control: plain pickle (what the old module-prefix rule effectively allowed) runs them."""
    marker = str(tmp_path / "PWNED")
    data = (genuine / ".metadata").read_bytes()
    evil = data[:2] + gadget("torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}") + data[2:]
    md = pickle.loads(evil)
    assert os.path.exists(marker) and type(md).__name__ == "Metadata"


def test_gadget_matrix_never_executes(genuine, tmp_path):
    marker = str(tmp_path / "PWNED")
    gadgets = _reachable_gadgets(marker)
    assert len(gadgets) >= 20  # the walk found the gadgets an attacker would use
    data = (genuine / ".metadata").read_bytes()
    d = tmp_path / "evil"
    shutil.copytree(genuine, d)
    for mod, name, arg in gadgets:
        (d / ".metadata").write_bytes(data[:2] + gadget(mod, name, arg) + data[2:])
        r = invoke("inspect", str(d))
        _assert_refused(r, marker, (mod, name))
        assert f"{mod}.{name}" in r.stderr  # names what it refused


def test_every_command_refuses_the_reproduction(genuine, tmp_path):
    marker = str(tmp_path / "PWNED")
    data = (genuine / ".metadata").read_bytes()
    d = tmp_path / "evil"
    shutil.copytree(genuine, d)
    (d / ".metadata").write_bytes(
        data[:2] + gadget("torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}") + data[2:])
    for cmd in _commands(str(d), tmp_path):
        r = invoke(*cmd)
        _assert_refused(r, marker, cmd)
        assert not (tmp_path / "out").exists()


def test_payload_before_junk_and_in_byte_entries(genuine, tmp_path):
    marker = str(tmp_path / "PWNED")
    d = tmp_path / "evil"
    shutil.copytree(genuine, d)
    (d / ".metadata").write_bytes(b"\x80\x04" + gadget("torch.distributed.checkpoint.filesystem", "os.system",
                                                       f"touch {marker}") + b"N.")
    _assert_refused(invoke("inspect", str(d)), marker, "before junk")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d2 = tmp_path / "evil2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.ones(2)}, "extra": {"x": Payload()}}, checkpoint_id=str(d2), no_dist=True)
    assert not os.path.exists(marker)
    for cmd in _commands(str(d2), tmp_path):
        _assert_refused(invoke(*cmd), marker, ("bytes entry", cmd))


def _rewrite_paths(d, new_path):
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    md = FileSystemReader(str(d)).read_metadata()  # test-side only: the genuine file, plain pickle
    for info in md.storage_data.values():
        info.relative_path = new_path
    with open(d / ".metadata", "wb") as f:
        pickle.dump(md, f)


@pytest.mark.parametrize("where", ["../outside.distcp", "/etc/passwd", "/dev/zero", "sub/../../outside.distcp",
                                   "link.distcp", "fifo.distcp"])
def test_shard_paths_stay_inside(genuine, tmp_path, where):
    d = tmp_path / "ck"
    shutil.copytree(genuine, d)
    shard = next(p for p in d.iterdir() if p.suffix == ".distcp")
    shutil.copy(shard, tmp_path / "outside.distcp")
    if where == "link.distcp":
        os.symlink(tmp_path / "outside.distcp", d / "link.distcp")
    if where == "fifo.distcp":
        os.mkfifo(d / "fifo.distcp")
    _rewrite_paths(d, where)
    for cmd in (["inspect", str(d)], ["diff", str(d), str(d)], ["convert", str(d), "--to", "torch", "-o",
                                                                  str(tmp_path / "o.pt")]):
        r = invoke(*cmd)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (where, r.stderr)
        assert "refused" in r.stderr or "outside" in r.stderr or "regular" in r.stderr, r.stderr
    assert not (tmp_path / "o.pt").exists()


def test_hidden_metadata_does_not_turn_a_hf_directory_into_dcp(genuine, tmp_path):
    d = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    shutil.copy(genuine / ".metadata", d / ".metadata")
    rep = json.loads(invoke("inspect", str(d), "--format", "json").stdout)
    assert rep["layout"] == "hf-trainer"


def test_fifo_and_device_inputs_are_refused(tmp_path):
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    for p in (str(fifo), "/dev/zero"):
        r = invoke("inspect", p)
        assert r.exit_code == 2 and "not a regular file" in r.stderr, r.stderr
        r = invoke("check", str(FIXTURES / "bundle.pt"), "--target", p)
        assert r.exit_code == 2, r.stderr
