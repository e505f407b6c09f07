"""The lazy placeholder reader against the torch-backed placeholder reader.

A torch zip whose pickle names a global outside the lazy reader's table (DeepSpeed's loss scaler, an
``argparse.Namespace``, a payload) is read from the same checked ``data.pkl`` bytes by the safe
reader's opcode loop over the lazy table: tensors as record references, every other global an inert
placeholder, torch not imported. What it reads is what the torch way reads (same object, same
``inspect`` report), every edit writes what the same edit of the torch way's read writes, nothing a
hostile pickle names is imported or called, and what it does not model still goes to torch."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES, ROOT, invoke
from test_lazy_reader import _as_torch
from test_reader_differential import _fixture_files
from test_security_placeholders import SLOT, _global, _splice, _str

from optckpt.io import torchfile
from optckpt.io.reader import NeedsGlobal, NeedsTorch, lazy_allowed, read_zip_pickle_lazy, read_zip_pickle_placeholders
from optckpt.io.safepickle import PickledGlobal, PickledObject, allowed, same
from optckpt.tensors import RecordTensor

ZERO = [FIXTURES / "zero_ckpts" / f"stage{s}" for s in (1, 2, 3)] + \
    [FIXTURES / "zero_ckpts_more" / kind / f"stage{s}" for kind in ("w2", "bf16") for s in (1, 2, 3)]
ZERO_IDS = [f"{p.parent.name}-{p.name}" for p in ZERO]


@contextlib.contextmanager
def _torch_way() -> Iterator[None]:
    """The lazy placeholder reader declines every file: the torch way reads it, as before it existed."""

    def declined(*args: Any, **kwargs: Any) -> Any:
        raise NeedsTorch("declined by the test")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torchfile, "read_zip_pickle_placeholders", declined)
        yield


@pytest.fixture
def torch_way() -> Any:
    return _torch_way


def _needs_global(path: Path) -> bool:
    checked = torchfile._check_zip(str(path))
    try:
        read_zip_pickle_lazy(str(path), checked.layout, checked.pickle, checked.prefix, {})
    except NeedsGlobal:
        return True
    except NeedsTorch:
        return False
    return False


def _has_torch_tensors(obj: Any) -> bool:
    stack, seen = [obj], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            return True
        if isinstance(v, dict):
            stack += v.values()
        elif isinstance(v, (list, tuple)):
            stack += v
    return False


PLACEHOLDER_FIXTURES = [p for p in _fixture_files() if _needs_global(p)]


@pytest.mark.parametrize("path", PLACEHOLDER_FIXTURES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_placeholder_fixture_reads_as_the_torch_way_reads_it(path: Path, torch_way: Any) -> None:
    new = torchfile.load_torch_file(str(path), lazy=True)
    with torch_way():
        old = torchfile.load_torch_file(str(path), lazy=True)
    assert (new.placeholders, new.saved_locations, new.zip_format) == (old.placeholders, old.saved_locations,
                                                                       old.zip_format)
    assert same(_as_torch(new.obj), old.obj)


def test_the_deepspeed_optimizer_files_are_read_without_torch_but_stage_3s() -> None:
    """Stages 1 and 2 (every fixture: one and two ranks, fp16 and bf16) read lazily with placeholders;
    stage 3's flat groups are pickled through ``torch._tensor._rebuild_from_type_v2`` with DeepSpeed's
    ``ds_id`` as the tensor's state, which the lazy reader leaves to torch."""
    optims = [p for d in ZERO for p in sorted(d.rglob("*optim_states.pt"))]
    assert len(optims) == 15 and set(optims) <= set(PLACEHOLDER_FIXTURES)
    for p in optims:
        got = torchfile.load_torch_file(str(p), lazy=True)
        assert got.placeholders
        scaler = got.obj["optimizer_state_dict"]["loss_scaler"]
        assert isinstance(scaler, PickledObject) and scaler.type_name == "deepspeed.runtime.fp16.loss_scaler.LossScaler"
        assert _has_torch_tensors(got.obj) == ("stage3" in str(p)), p


@pytest.mark.parametrize("d", ZERO, ids=ZERO_IDS)
def test_deepspeed_inspect_reports_are_the_torch_ways(d: Path, torch_way: Any) -> None:
    for args in (["inspect", str(d), "--format", "json"], ["inspect", str(d), "--format", "table"]):
        new = invoke(*args)
        with torch_way():
            old = invoke(*args)
        assert new.exit_code == old.exit_code == 0, new.stderr
        assert new.stdout == old.stdout


def _no_torch(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_real_deepspeed_checkpoints_are_inspected_and_checked_without_torch(tmp_path: Path) -> None:
    """DeepSpeed's own files (loss scaler, stage enum, fragment addresses pickled): ``inspect`` and
    ``check`` against a names file in a process that never imports torch."""
    names = tmp_path / "names.json"
    code = ("import json, sys, optckpt\n"
            "from optckpt.io import load\n"
            "for d in sys.argv[2:]:\n"
            "    r = optckpt.inspect(d)\n"
            "    assert r.data['optimizers'], r.data\n"
            "    opt = load(d, lazy=True).optimizer()\n"
            "    json.dump([list(opt.state_dict['param_groups'][i]['params']) for i in range(2)],"
            " open(sys.argv[1], 'w'))\n"
            "    assert optckpt.check(d, sys.argv[1]).exit_code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    stages = [str(FIXTURES / "zero_ckpts" / s) for s in ("stage1", "stage2")]
    r = _no_torch(code, str(names), *stages)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_cli_imports_no_torch_for_a_deepspeed_checkpoint() -> None:
    d = FIXTURES / "zero_ckpts" / "stage2"
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "optckpt", "inspect", str(d)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
    assert "optckpt.cli" in imported and "torch" not in imported


def test_torch_allowlist_outside_the_lazy_table_is_torchs_own() -> None:
    """The lazy placeholder reader sends every ``torch.*`` global beyond its table to torch (torch's
    allowlist may accept it) and makes every other global a placeholder: that is the torch way's
    verdict only while the allowlist holds nothing else beyond the table but numpy's constructors
    (which it takes as the safe reader does)."""
    beyond = set(allowed()) - lazy_allowed()
    assert beyond and all(m == "torch" or m.startswith("torch.") or m.startswith("numpy") for m, _ in beyond), \
        sorted(m for m in beyond if not m[0].startswith(("torch", "numpy")))


# ---- writers: a file read lazily with placeholders is written as the torch way's read was --------

def _records(path: Path) -> dict[str, bytes]:
    """The zip's records by name (the last directory: an in-place edit's version), but the random
    serialization id."""
    with zipfile.ZipFile(path) as z:
        return {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()
                if not i.filename.endswith("serialization_id")}


def _tree(root: Path) -> dict[str, Any]:
    if root.is_file():
        return {"": _records(root)}
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = _records(p) if torchfile.sniff(str(p)) == "zip" else p.read_bytes()
    return out


def _with_args(tmp_path: Path) -> Path:
    """bundle.pt with an ``argparse.Namespace`` (a placeholder), a ``torch.Size`` and a dtype beside
    the state (the lazy reader's stand-ins of both, outside the placeholder)."""
    good = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    good["args"] = argparse.Namespace(lr=0.1, arch="cnn", layers=[1, 2])
    good["shape"], good["dtype"] = torch.Size([2, 3]), torch.float16
    path = tmp_path / "args.pt"
    torch.save(good, path)
    return path


NAMES = ["conv2.weight", "conv2.bias", "conv.weight", "conv.bias", "bn.weight", "bn.bias", "classifier.weight",
         "classifier.bias"]


@pytest.mark.parametrize("cmd", ["set", "reset", "remap", "set-in-place"])
def test_edits_of_a_placeholder_file_write_what_the_torch_way_wrote(tmp_path: Path, torch_way: Any, cmd: str) -> None:
    src = _with_args(tmp_path)
    assert _needs_global(src)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(NAMES))
    outs = []
    for way in ("lazy", "torch"):
        ck = tmp_path / f"{way}.pt"
        shutil.copy(src, ck)
        out = tmp_path / f"{way}-out.pt"
        args = {"set": ["set", str(ck), "--scale-lr", "0.5", "-o", str(out)],
                "reset": ["reset", str(ck), "--params", "bn.*", "-o", str(out)],
                "remap": ["remap", str(ck), "--target", str(names), "-o", str(out)],
                "set-in-place": ["set", str(ck), "--scale-lr", "0.5", "--in-place"]}[cmd]
        if way == "lazy":
            loaded = torchfile.load_torch_file(str(ck), lazy=True)
            assert loaded.placeholders and not _has_torch_tensors(loaded.obj)
            r = invoke(*args)
        else:
            with torch_way():
                r = invoke(*args)
        assert r.exit_code == 0, r.stderr
        outs.append(ck if cmd == "set-in-place" else out)
    assert _records(outs[0]) == _records(outs[1])
    back = torch.load(outs[0], weights_only=False)  # (Namespace: a trusted class of the standard library)
    assert back["args"] == argparse.Namespace(lr=0.1, arch="cnn", layers=[1, 2])
    assert back["shape"] == torch.Size([2, 3]) and type(back["shape"]) is torch.Size and back["dtype"] is torch.float16


@pytest.mark.parametrize("in_place", [False, True], ids=["output", "in-place"])
def test_deepspeed_edits_write_what_the_torch_way_wrote(tmp_path: Path, torch_way: Any, in_place: bool) -> None:
    outs = []
    for way in ("lazy", "torch"):
        d = tmp_path / way
        shutil.copytree(FIXTURES / "zero_ckpts" / "stage2", d)
        out = tmp_path / f"{way}-out"
        args = ["set", str(d), "--scale-lr", "0.5", *(["--in-place"] if in_place else ["-o", str(out)])]
        if way == "lazy":
            r = invoke(*args)
        else:
            with torch_way():
                r = invoke(*args)
        assert r.exit_code == 0, r.stderr
        outs.append(d if in_place else out)
    assert _tree(outs[0]) == _tree(outs[1])


# ---- hostile pickles through the lazy placeholder path ------------------------------------------

def _payloads(cmd: str) -> dict[str, bytes]:
    sysg = _global("os", "system")
    thing = _global("evilmod", "Thing")
    return {
        "reduce": sysg + b"(" + _str(cmd) + b"tR",
        "newobj": sysg + b"(" + _str(cmd) + b"t\x81",
        "newobj_ex": sysg + b"(" + _str(cmd) + b"t}\x92",
        "build": sysg + b")\x81}" + _str("cmd") + _str(cmd) + b"sb",
        "build_on_result": sysg + b"(" + _str(cmd) + b"tR}" + _str("cmd") + _str(cmd) + b"sb",
        "inst": b"(" + _str(cmd) + b"ios\nsystem\n",
        "obj": b"(" + sysg + _str(cmd) + b"o",
        "import_module": thing + b")\x81",
        "inst_module": b"(" + _str(cmd) + b"ievilmod\nThing\n",
        "setitems_on_object": thing + b")\x81(" + _str("k") + _str(cmd) + b"u",
        "appends_on_object": thing + b")\x81(" + _str(cmd) + b"e",
    }


def test_hostile_globals_are_inert_placeholders_and_import_nothing(tmp_path: Path) -> None:
    """``os.system`` / an importable module's class through REDUCE, NEWOBJ(_EX), BUILD, INST, OBJ,
    SETITEMS and APPENDS, beside real tensors: read by the lazy placeholder reader in a process without
    torch, each an inert placeholder; no module is imported by the read, nothing runs."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "evilmod.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\nclass Thing:\n    pass\n")
    marker = tmp_path / "PWNED"
    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.arange(4.0), "x": "@@SLOT@@", "m": {"b": torch.ones(2, dtype=torch.int64)}}, clean)
    files = []
    for name, payload in _payloads(f"touch {marker}").items():
        path = tmp_path / f"{name}.pt"
        _splice(clean, path, payload, legacy=False)
        files.append(str(path))
    code = ("import sys\n"
            "from optckpt.io.torchfile import load_torch_file\n"
            "from optckpt.io.safepickle import PickledGlobal, PickledObject\n"
            "from optckpt.tensors import RecordTensor\n"
            "load_torch_file(sys.argv[1], lazy=True)  # (the readers' own modules imported once)\n"
            "for p in sys.argv[2:]:\n"
            "    before = set(sys.modules)\n"
            "    got = load_torch_file(p, lazy=True)\n"
            "    new = set(sys.modules) - before\n"
            "    assert not new, (p, sorted(new))\n"
            "    assert got.placeholders, p\n"
            "    x = got.obj['x']\n"
            "    assert isinstance(x, (PickledObject, PickledGlobal)), (p, x)\n"
            "    assert type(got.obj['w']) is RecordTensor and type(got.obj['m']['b']) is RecordTensor, p\n"
            "    print(p.rsplit('/', 1)[-1], repr(x))\n"
            "assert 'torch' not in sys.modules and 'evilmod' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    r = subprocess.run([sys.executable, "-c", code, str(clean), *files], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.splitlines()) == len(files)
    assert not marker.exists() and not (tmp_path / "IMPORTED").exists()
    # and in this process: the same placeholders the torch way reads (it imports nothing either)
    for p in files:
        got = torchfile.load_torch_file(p, lazy=True)
        assert got.placeholders and not _has_torch_tensors(got.obj)
        x = got.obj["x"]
        assert isinstance(x, (PickledObject, PickledGlobal))
        name = x.type_name if isinstance(x, PickledObject) else x.name
        assert name in ("os.system", "evilmod.Thing"), (p, name)
    assert not marker.exists() and not (tmp_path / "IMPORTED").exists()


def test_what_the_torch_way_may_read_otherwise_goes_to_it(tmp_path: Path) -> None:
    """Beside a placeholder: a torch global beyond the lazy table, a tensor inside a pickled object,
    a dtype inside one, a file whose only global beyond the table is numpy's, BUILD on a tensor."""
    import numpy as np

    args = argparse.Namespace(lr=0.1)
    cases = {
        "device": {"w": torch.ones(2), "a": args, "dev": torch.device("cpu")},
        "tensor_in_object": {"w": torch.ones(2), "a": argparse.Namespace(t=torch.zeros(3))},
        "dtype_in_object": {"w": torch.ones(2), "a": argparse.Namespace(dtype=torch.float16)},
        "numpy_only": {"w": torch.ones(2), "arr": np.arange(3)},
    }
    for name, obj in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        checked = torchfile._check_zip(str(path))
        with pytest.raises(NeedsGlobal):
            read_zip_pickle_lazy(str(path), checked.layout, checked.pickle, checked.prefix, {})
        with pytest.raises(NeedsTorch):
            read_zip_pickle_placeholders(str(path), checked.layout, checked.pickle, checked.prefix, {})
        got = torchfile.load_torch_file(str(path), lazy=True)
        assert isinstance(got.obj["w"], torch.Tensor), name  # read the torch way
        assert got.placeholders == (name != "numpy_only"), name
    # numpy beside a placeholder: numpy's constructors, as the safe reader calls them
    path = tmp_path / "numpy_and_args.pt"
    torch.save({"w": torch.ones(2), "arr": np.arange(3), "a": args}, path)
    got = torchfile.load_torch_file(str(path), lazy=True)
    assert got.placeholders and type(got.obj["w"]) is RecordTensor
    assert type(got.obj["arr"]) is np.ndarray and got.obj["arr"].tolist() == [0, 1, 2]
    # BUILD on a tensor (the memoised tensor fetched again, given a state): torch's to decide
    path = tmp_path / "build.pt"
    torch.save({"w": torch.ones(2), "a": args, "x": "@@SLOT@@"}, path)
    ops = list(pickletools.genops(torchfile._check_zip(str(path)).pickle))
    reduces = [i for i, (op, _, _) in enumerate(ops) if op.name == "REDUCE"]
    put = ops[reduces[1] + 1]  # the tensor's memo slot (the first REDUCE builds its hooks' OrderedDict)
    assert put[0].name == "BINPUT"
    spliced = tmp_path / "build2.pt"
    _splice(path, spliced, b"h" + bytes([put[1]]) + b"}b", legacy=False)
    checked = torchfile._check_zip(str(spliced))
    with pytest.raises(NeedsTorch, match="BUILD"):
        read_zip_pickle_placeholders(str(spliced), checked.layout, checked.pickle, checked.prefix, {})


def _build_after(path: Path, out: Path, target: bytes, state: bytes) -> None:
    """``path`` with the pickled string SLOT replaced by ``target`` (opcodes pushing an object),
    ``state`` (opcodes pushing a state) and BUILD: the object, its state set, in SLOT's place."""
    _splice(path, out, target + state + b"b", legacy=False)


def _tensor_slot(path: Path) -> bytes:
    """Opcodes fetching the memoised tensor of a ``{"w": tensor, "x": SLOT}`` file again."""
    ops = list(pickletools.genops(torchfile._check_zip(str(path)).pickle))
    reduces = [i for i, (op, _, _) in enumerate(ops) if op.name == "REDUCE"]
    put = ops[reduces[1] + 1]  # the tensor's memo slot (the first REDUCE builds its hooks' OrderedDict)
    assert put[0].name == "BINPUT"
    return b"h" + bytes([put[1]])


def test_a_pickled_state_never_changes_a_stand_in(tmp_path: Path) -> None:
    """BUILD with a slot state (``(None, {name: value})``) on the lazy reader's stand-ins: on a
    record tensor it would point the tensor at other bytes of the file (the local header at byte 0),
    on a dtype it would change that dtype for every later read in the process (float32's itemsize 1).
    Both go to torch, whose loader refuses them: one line, exit 2; the dtype is untouched."""
    from optckpt.errors import LoadError
    from optckpt.tensors import DTYPES

    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.ones(2), "x": SLOT}, clean)
    slot_state = b"N}X\x0b\x00\x00\x00data_offsetK\x00sX\x0e\x00\x00\x00storage_nbytesM\x00\x10s\x86"
    cases = {"tensor": (_tensor_slot(clean), slot_state),
             "dtype": (b"ctorch\nfloat32\n", b"N}X\x08\x00\x00\x00itemsizeK\x01s\x86")}
    for name, (target, state) in cases.items():
        path = tmp_path / f"{name}.pt"
        _build_after(clean, path, target, state)
        with pytest.raises((pickle.UnpicklingError, TypeError, RuntimeError)):  # (torch refuses, or set_ fails)
            torch.load(path, weights_only=True)
        checked = torchfile._check_zip(str(path))
        with pytest.raises(NeedsTorch):
            read_zip_pickle_lazy(str(path), checked.layout, checked.pickle, checked.prefix, {})
        with pytest.raises(LoadError):
            torchfile.load_torch_file(str(path), lazy=True)
        r = invoke("inspect", str(path))
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert DTYPES["float32"].itemsize == 4 and DTYPES["float32"]._fmt == "f"
    got = torchfile.load_torch_file(str(clean), lazy=True).obj["w"]  # later reads: as before
    assert type(got) is RecordTensor and got.storage_nbytes == 8 and got.dtype.itemsize == 4
    assert got.materialize().tolist() == [1.0, 1.0]


def test_a_pickled_state_for_a_tensor_or_storage_torch_built_is_refused(tmp_path: Path) -> None:
    """The torch-backed C reader (what reads a file the lazy reader leaves to torch, and every
    ``lazy=False`` load): BUILD on a tensor it made (``Tensor.__setstate__``'s legacy forms: hooks and
    ``requires_grad`` set, the data swapped for another tensor's) or on a storage (its dtype changed
    before a tensor is made of it). torch's weights-only loader refuses each; so does optckpt, in one
    line, whichever reader it starts with."""
    from optckpt.errors import LoadError

    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.ones(2), "v": torch.zeros(2), "x": SLOT}, clean)
    hooks = b"ccollections\nOrderedDict\n)RK\x01X\x01\x00\x00\x00zs"
    files = {}
    for name, state in {"hooks": b"\x89N" + hooks + b"\x87",
                        "grad_only": b"\x88NN\x87",
                        "data_swap": b"(h" + bytes([_memo_of(clean, 3)]) + b"NN\x89Nt"}.items():
        files[name] = tmp_path / f"{name}.pt"
        _build_after(clean, files[name], _tensor_slot(clean), state)
    # a storage's dtype changed between its reference and the tensor made of it
    files["storage"] = tmp_path / "storage.pt"
    pkl = torchfile._check_zip(str(clean)).pickle
    i = pkl.index(b"Q")  # the first BINPERSID
    spliced = pkl[:i + 1] + b"N}X\x05\x00\x00\x00dtypectorch\nfloat64\ns\x86b" + pkl[i + 1:]
    with zipfile.ZipFile(clean) as zin, zipfile.ZipFile(files["storage"], "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, spliced if info.filename.endswith("data.pkl") else zin.read(info))
    for name, path in files.items():
        with pytest.raises((pickle.UnpicklingError, TypeError, RuntimeError)):  # (torch refuses, or set_ fails)
            torch.load(path, weights_only=True)
        for lazy in (True, False):
            with pytest.raises(LoadError, match="refused|corrupt"):
                torchfile.load_torch_file(str(path), lazy=lazy)
        r = invoke("inspect", str(path))
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
    assert torchfile.load_torch_file(str(clean), lazy=False).obj["w"].tolist() == [1.0, 1.0]


def _memo_of(path: Path, k: int) -> int:
    """The memo slot of the ``k``-th REDUCE's result in ``path``'s pickle."""
    ops = list(pickletools.genops(torchfile._check_zip(str(path)).pickle))
    reduces = [i for i, (op, _, _) in enumerate(ops) if op.name == "REDUCE"]
    assert ops[reduces[k] + 1][0].name == "BINPUT"
    return ops[reduces[k] + 1][1]


def test_a_pickled_state_for_a_class_or_function_is_put_back_and_refused(tmp_path: Path) -> None:
    """BUILD on a global the pickle named: ``collections.Counter`` (a method replaced for the whole
    process), optckpt's ``Size``, torch's ``_rebuild_parameter`` (its defaults). The C readers
    hand out the real objects, and the C loop's BUILD sets their state; torch's loader refuses it.
    Every such change is put back and the file refused in one line, by either reader."""
    import collections

    from optckpt.errors import LoadError
    from optckpt.tensors import Size

    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.ones(2), "x": SLOT}, clean)
    before = {"counter": collections.Counter.most_common, "size": dict(vars(Size)),
              "defaults": torch._utils._rebuild_parameter.__defaults__}
    cases = {
        "counter": b"ccollections\nCounter\nN}X\x0b\x00\x00\x00most_commonK\x07s\x86b",
        "size": b"ctorch\nSize\nN}X\x07\x00\x00\x00__len__ccollections\nOrderedDict\ns\x86b",
        "defaults": b"ctorch._utils\n_rebuild_parameter\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b",
    }
    for name, payload in cases.items():
        path = tmp_path / f"{name}.pt"
        _splice(clean, path, payload, legacy=False)
        with pytest.raises((pickle.UnpicklingError, TypeError, RuntimeError)):  # (torch refuses, or set_ fails)
            torch.load(path, weights_only=True)
        for lazy in (True, False):
            with pytest.raises(LoadError, match="refused|immutable type"):  # (torch.Size: a C type)
                torchfile.load_torch_file(str(path), lazy=lazy)
            assert collections.Counter.most_common is before["counter"]
            assert dict(vars(Size)) == before["size"]
            assert torch._utils._rebuild_parameter.__defaults__ is before["defaults"]
        r = invoke("inspect", str(path))
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
    assert collections.Counter("aab").most_common(1) == [("a", 2)]


def test_dcp_metadata_cannot_change_its_classes(tmp_path: Path) -> None:
    """The DCP metadata reader (a C unpickler over DCP's dataclasses): BUILD on the ``Metadata``
    class itself is put back and refused."""
    from torch.distributed.checkpoint.metadata import Metadata

    from optckpt.errors import LoadError
    from optckpt.io.dcp import read_dcp_metadata

    before = dict(vars(Metadata))
    (tmp_path / ".metadata").write_bytes(b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n"
                                         b"N}X\x0c\x00\x00\x00storage_dataK\x01s\x86b.")
    with pytest.raises(LoadError, match="refused"):
        read_dcp_metadata(str(tmp_path))
    assert dict(vars(Metadata)) == before


def test_stand_ins_copy_as_values() -> None:
    """A dtype is one object (copies are it, and it cannot be changed); a record tensor copies as
    another reference to the same record, also once its file is mapped (a deepcopy of a scheduler
    state holding one)."""
    import copy

    from optckpt.tensors import DTYPES

    f32 = DTYPES["float32"]
    assert copy.copy(f32) is f32 and copy.deepcopy({"d": f32})["d"] is f32
    with pytest.raises(AttributeError):
        f32.itemsize = 1
    got = torchfile.load_torch_file(str(FIXTURES / "bundle.pt"), lazy=True).obj
    t = next(v for v in got["model"].values() if type(v) is RecordTensor)
    t.item() if t.numel() == 1 else t.source.view(t.data_offset, 1)  # (the file mapped)
    u = copy.deepcopy({"t": t})["t"]
    assert u is not t and type(u) is RecordTensor
    assert (u.key, u.data_offset, u.shape, u.stride(), u.dtype, u.source) == (t.key, t.data_offset, t.shape,
                                                                              t.stride(), t.dtype, t.source)
    assert torch.equal(u.materialize(), t.materialize())


def test_a_storage_reference_to_no_record_is_refused_in_one_line(tmp_path: Path) -> None:
    """The checked records decide in the placeholder path too: a storage key the zip does not hold."""
    path = tmp_path / "s.pt"
    torch.save({"w": torch.ones(2), "a": argparse.Namespace(lr=0.1)}, path)
    checked = torchfile._check_zip(str(path))
    pkl = checked.pickle.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x009", 1)  # storage key "0" -> "9"
    assert pkl != checked.pickle
    from optckpt.errors import LoadError

    with pytest.raises(LoadError, match="does not hold"):
        read_zip_pickle_placeholders(str(path), checked.layout, pkl, checked.prefix, {})


def test_the_placeholder_read_leaves_no_cyclic_garbage() -> None:
    """Both passes (the C one that stops at the global, the placeholder one) free what they built by
    reference counts: no cycle keeps an unpickler's memo alive until a cyclic collection."""
    import gc

    path = str(FIXTURES / "zero_ckpts" / "stage2" / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torchfile.load_torch_file(path, lazy=True)  # (first-use imports and caches)
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        got = torchfile.load_torch_file(path, lazy=True)
        assert got.placeholders and not _has_torch_tensors(got.obj)
        del got
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
        assert not kinds & {"_LazyUnpickler", "_LazyPlaceholderUnpickler", "_LazyStorage", "RecordTensor",
                            "PickledObject"}, kinds
        assert len(gc.garbage) < 50, len(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()
