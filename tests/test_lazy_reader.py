"""The lazy reader (record references, no torch) against ``torch.load(weights_only=True)``.

For every zip fixture and the generated corpus of ``test_reader_differential``: what the lazy reader
describes without reading a tensor byte (dtype, shape, stride, storage offset, requires_grad,
Parameter or not, which tensors share a storage) is what torch returns, and the tensors it then
materialises are torch's bit for bit. What it does not model (numpy arrays, devices, hooks, odd
views) sends the file to the torch-backed reader, whose verdict stands; what that reader refuses
stays refused. Its tables agree with the installed torch, and it accepts only globals of the safe
reader's exact allowlist. Metadata commands run without importing torch at all."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES, ROOT
from test_reader_differential import _corpus_object, _fixture_files, _same

from optckpt import io as optckpt_io
from optckpt.io import torchfile
from optckpt.io.reader import NeedsTorch, lazy_allowed, read_zip_pickle_lazy
from optckpt.io.safepickle import allowed
from optckpt.tensors import DTYPES, STORAGE_DTYPES, RecordTensor, Size, is_tensor, materialize


def _lazy(path: Path) -> Any:
    checked = torchfile._check_zip(str(path))
    assert checked.fast
    return read_zip_pickle_lazy(str(path), checked.layout, checked.pickle, checked.prefix, {})


def _meta_same(lazy: Any, real: Any, where: str = "root") -> None:
    """Every RecordTensor describes its torch counterpart exactly, before any byte is read."""
    if type(lazy) is RecordTensor:
        assert isinstance(real, torch.Tensor), where
        assert lazy.dtype == real.dtype and str(lazy.dtype) == str(real.dtype), where
        assert (tuple(lazy.shape), lazy.stride(), lazy.storage_offset(), lazy.requires_grad, lazy.numel(),
                lazy.element_size()) == (tuple(real.shape), real.stride(), real.storage_offset(), real.requires_grad,
                                         real.numel(), real.element_size()), where
        assert lazy.is_parameter == isinstance(real, torch.nn.Parameter), where
        assert lazy.storage_nbytes == real.untyped_storage().nbytes(), where
        return
    if isinstance(lazy, dict):
        assert list(lazy) == list(real), where
        for k in lazy:
            _meta_same(lazy[k], real[k], f"{where}[{k!r}]")
    elif isinstance(lazy, (list, tuple)):
        assert len(lazy) == len(real), where
        for i, (x, y) in enumerate(zip(lazy, real)):
            _meta_same(x, y, f"{where}[{i}]")


def _as_torch(obj: Any) -> Any:
    """The lazy result as torch would hold it: tensors materialised, Size as torch.Size."""
    obj = materialize(obj)

    def walk(v: Any) -> Any:
        if type(v) is Size:
            return torch.Size(v)
        if type(v) in (list, tuple):
            return type(v)(walk(x) for x in v)
        if isinstance(v, dict):
            for k in list(v):
                v[k] = walk(v[k])
        return v

    return walk(obj)


def _check(path: Path) -> bool:
    """Compare the lazy read of ``path`` with torch's; False when the lazy reader handed it on."""
    try:
        lazy = _lazy(path)
    except NeedsTorch:
        return False
    expected = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    _meta_same(lazy, expected)
    _same(_as_torch(lazy), expected, {}, {})
    return True


@pytest.mark.parametrize("path", _fixture_files(), ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_fixture_reads_lazily_as_torch_reads_it(path: Path) -> None:
    try:
        torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError:  # beyond torch's table: the lazy reader must hand it on
        with pytest.raises(NeedsTorch):
            _lazy(path)
        return
    _check(path)


def test_every_fixture_torch_reads_weights_only_needs_no_torch() -> None:
    """The lazy reader is the usual path, not the exception: every fixture that torch's weights-only
    load reads (all but pickled objects: DeepSpeed's loss scaler, GaLore's projector, trainer args)."""
    readable = []
    for p in _fixture_files():
        try:
            torch.load(p, weights_only=True, mmap=True, map_location="cpu")
        except pickle.UnpicklingError:
            continue
        readable.append(p)
    assert len(readable) >= 25
    assert [p for p in readable if not _check(p)] == []


@pytest.mark.parametrize("seed", range(40))
def test_generated_corpus_reads_lazily_as_torch_reads_it(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    obj = {"payload": _corpus_object(rng, 0, []), "many": [torch.tensor(float(i)) for i in range(50)]}
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    if not _check(path):  # a device or another global it does not model: the eager reader's result
        loaded = torchfile.load_torch_file(str(path), lazy=True)
        _same(loaded.obj, torch.load(path, weights_only=True, mmap=True), {}, {})


def test_every_dtype_and_shared_storages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (torch cannot even make an empty float4 tensor while deterministic algorithms fill new memory,
    # which another test of the same worker may have switched on)
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    base = torch.arange(12, dtype=torch.float32)
    obj: dict[str, Any] = {"a": base, "b": base[3:7], "c": base.view(3, 4).t(), "e": torch.empty(0, 5),
                           "z": torch.tensor(1), "tied": base, "p": torch.nn.Parameter(torch.ones(2))}
    for name in DTYPES:
        dt = getattr(torch, name)
        obj[name] = torch.arange(48, dtype=torch.uint8).view(dt)  # any bytes: every dtype, even those without casts
    path = tmp_path / "s.pt"
    torch.save(obj, path)
    assert _check(path)
    lazy = _lazy(path)
    assert lazy["a"].key == lazy["b"].key == lazy["tied"].key != lazy["e"].key
    for name in DTYPES:
        assert str(lazy[name].dtype) == f"torch.{name}"
    assert lazy["z"].item() == 1 and lazy["p"].is_parameter


def test_scalars_decode_without_torch(tmp_path: Path) -> None:
    vals = {"f32": torch.tensor(1.5), "f64": torch.tensor(-2.25, dtype=torch.float64),
            "f16": torch.tensor(0.5, dtype=torch.float16), "bf16": torch.tensor(3.0, dtype=torch.bfloat16),
            "i64": torch.tensor(7), "u8": torch.tensor(200, dtype=torch.uint8), "b": torch.tensor(True),
            "view": torch.arange(5.0)[3]}
    path = tmp_path / "v.pt"
    torch.save(vals, path)
    lazy = _lazy(path)
    for k, t in vals.items():
        assert lazy[k].item() == t.item(), k


def test_tables_agree_with_the_installed_torch() -> None:
    for name, dt in DTYPES.items():
        real = getattr(torch, name)
        assert (dt.itemsize, dt.is_floating_point, dt.is_complex) == (real.itemsize, real.is_floating_point,
                                                                      real.is_complex), name
        assert dt == real and real == dt and hash(dt) == hash(str(real))
    for name, dt in STORAGE_DTYPES.items():
        assert getattr(torch, name).dtype == dt, name
    assert lazy_allowed() <= set(allowed())  # nothing the safe reader's exact allowlist lacks


def test_what_it_does_not_model_goes_to_the_torch_reader(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "n.pt"
    torch.save({"w": torch.ones(2), "dev": torch.device("cpu"), "arr": np.arange(3)}, path)
    with pytest.raises(NeedsTorch):
        _lazy(path)
    loaded = torchfile.load_torch_file(str(path), lazy=True)
    assert isinstance(loaded.obj["w"], torch.Tensor) and not loaded.placeholders


def test_a_refused_global_is_still_refused_or_a_placeholder(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> Any:
            return (os.getcwd, ())

    path = tmp_path / "bad.pt"
    torch.save({"x": Evil()}, path)
    loaded = torchfile.load_torch_file(str(path), lazy=True)
    assert loaded.placeholders and not is_tensor(loaded.obj["x"])


def test_a_view_past_its_storage_is_left_to_torch(tmp_path: Path) -> None:
    """A crafted view reaching beyond its record: the lazy reader does not describe it; torch's own
    reader refuses it as before (one line, exit 2 through the CLI)."""
    path = tmp_path / "v.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    checked = torchfile._check_zip(str(path))
    pkl = checked.pickle
    i = pkl.index(b"K\x04\x85")  # the size tuple (4,)
    forged = pkl[:i] + b"K\x09\x85" + pkl[i + 3:]  # (9,): past the 16-byte record
    with pytest.raises(NeedsTorch):
        read_zip_pickle_lazy(str(path), checked.layout, forged, checked.prefix, {})


def test_a_load_keeps_one_tuple_a_shape_and_stride(tmp_path: Path) -> None:
    """A parameter and its Adam moments share their shape and stride tuples after a lazy read (the
    pickle's own copies go with the load); a shape of bools or floats that equals an int shape is
    not taken for it (compared only once checked: still left to torch)."""
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters())
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = tmp_path / "a.pt"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, path)
    got = torchfile.load_torch_file(str(path), lazy=True).obj
    w, state = got["model"]["weight"], got["optimizer"]["state"][0]
    assert w.shape == (2, 3) and state["exp_avg"].shape is w.shape and state["exp_avg_sq"].shape is w.shape
    assert state["exp_avg"].stride() is w.stride()
    checked = torchfile._check_zip(str(path))
    i = checked.pickle.index(b"K\x02K\x03\x86")  # the weight's size (2, 3)
    for forged in (b"\x88K\x03\x86", b"G@\x00\x00\x00\x00\x00\x00\x00K\x03\x86"):  # (True, 3), (2.0, 3)
        pkl = checked.pickle[:i] + forged + checked.pickle[i + 5:]
        with pytest.raises(NeedsTorch):
            read_zip_pickle_lazy(str(path), checked.layout, pkl, checked.prefix, {})


def _no_torch(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)


def test_inspect_imports_no_torch() -> None:
    code = ("import sys, optckpt\n"
            "r = optckpt.inspect(sys.argv[1], model=sys.argv[2])\n"
            "assert r.data['optimizers'], r.data\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = _no_torch(code, "fixtures/seed/optimizer_0.pth", "fixtures/seed/model_0.pth")
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_cli_inspect_imports_no_torch() -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "optckpt", "inspect", "fixtures/bundle.pt"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
    assert "optckpt.cli" in imported and "torch" not in imported
    # nor the writers: a file with no earlier in-place version needs no version walk
    assert not {"optckpt.io.append", "optckpt.io.write"} & imported


def _rewrite(src: Path, dest: Path) -> Any:
    """``src`` read lazily and written back by optckpt's own pickler (records copied as they are)."""
    from optckpt.io.records import _rewrite_lazy, _source_records

    obj = _lazy(src)
    found = _source_records(str(src))
    assert found is not None
    prefix, by_offset, small = found
    assert _rewrite_lazy(str(src), obj, str(dest), prefix, by_offset, small)
    return obj


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_files_written_by_the_own_pickler_load_in_torch_as_written(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    obj = {"payload": _corpus_object(rng, 0, []), "many": [torch.tensor(float(i)) for i in range(50)]}
    src, dest = tmp_path / "c.pt", tmp_path / "out.pt"
    torch.save(obj, src)
    try:
        _lazy(src)
    except NeedsTorch:
        pytest.skip("a global the lazy reader does not model: written the torch way")
    _rewrite(src, dest)
    _same(torch.load(dest, weights_only=True, mmap=True), torch.load(src, weights_only=True, mmap=True), {}, {})
    _same(torch.load(dest, weights_only=True), torch.load(src, weights_only=True), {}, {})  # plain reads too


@pytest.mark.parametrize("path", [p for p in _fixture_files() if "zero_ckpts" not in str(p)][:30],
                         ids=lambda p: str(p.relative_to(FIXTURES)))
def test_fixtures_rewritten_by_the_own_pickler_load_in_torch_as_before(tmp_path: Path, path: Path) -> None:
    try:
        before = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        _lazy(path)
    except (pickle.UnpicklingError, NeedsTorch):
        pytest.skip("not lazily readable")
    dest = tmp_path / "out.pt"
    _rewrite(path, dest)
    _same(torch.load(dest, weights_only=True, mmap=True, map_location="cpu"), before, {}, {})


def test_the_written_pickle_is_read_back_as_the_object(tmp_path: Path) -> None:
    from optckpt.io.lazypickle import dump, same_structure

    base = torch.arange(6.0)
    src = tmp_path / "s.pt"
    torch.save({"a": base, "b": base[2:], "p": torch.nn.Parameter(torch.ones(2)), "f8": torch.zeros(4).to(
        torch.float8_e4m3fn), "n": float("nan"), "big": 1 << 70, "neg": -5, "s": torch.Size([2, 3]),
        "d": torch.float16, "set": {1, 2}, "c": 1 + 2j, "bytes": b"\x00\xff"}, src)
    obj = _lazy(src)
    data, keys = dump(obj, lambda t: t.key)
    assert sorted(keys) == sorted({t.key for t in obj.values() if type(t) is RecordTensor})
    dest = tmp_path / "d.pt"
    _rewrite(src, dest)
    assert same_structure(obj, _lazy(dest), lambda t: t.key) is None
    obj["a"].requires_grad = True  # a difference is found
    assert same_structure(obj, _lazy(dest), lambda t: t.key) is not None


def test_set_check_remap_and_reset_drop_with_a_names_file_import_no_torch(tmp_path: Path) -> None:
    import shutil

    ck = tmp_path / "b.pt"
    shutil.copy(FIXTURES / "bundle.pt", ck)
    names = tmp_path / "names.json"
    names.write_text('["conv2.weight", "conv2.bias", "conv.weight", "conv.bias", "bn.weight", "bn.bias", '
                     '"classifier.weight", "classifier.bias"]')
    code = ("import sys, optckpt\n"
            "optckpt.set_hparams(sys.argv[1], lr=0.5, in_place=True)\n"
            "optckpt.set_hparams(sys.argv[1], sys.argv[2], lr=0.25)\n"
            "assert optckpt.check(sys.argv[1], sys.argv[3]).exit_code == 1\n"
            "optckpt.remap(sys.argv[1], sys.argv[3], sys.argv[4])\n"
            "assert optckpt.check(sys.argv[4], sys.argv[3]).exit_code == 0\n"
            "optckpt.reset(sys.argv[4], ['bn.*'], sys.argv[5])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = _no_torch(code, str(ck), str(tmp_path / "c.pt"), str(names), str(tmp_path / "r.pt"), str(tmp_path / "z.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(ck, weights_only=True)
    c = torch.load(tmp_path / "c.pt", weights_only=True)
    orig = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    assert a["optimizer"]["param_groups"][0]["lr"] == 0.5 and c["optimizer"]["param_groups"][0]["lr"] == 0.25
    for k in orig["model"]:
        assert torch.equal(a["model"][k], orig["model"][k]) and torch.equal(c["model"][k], orig["model"][k])
    for i, st in orig["optimizer"]["state"].items():
        for key, v in st.items():
            assert torch.equal(a["optimizer"]["state"][i][key], v) and torch.equal(c["optimizer"]["state"][i][key], v)
    r_sd = torch.load(tmp_path / "r.pt", weights_only=True)["optimizer"]
    z_sd = torch.load(tmp_path / "z.pt", weights_only=True)["optimizer"]
    order = [4, 5, 0, 1, 2, 3, 6, 7]  # the names file's order, in saved indices
    for new, old in enumerate(order):
        for key, v in orig["optimizer"]["state"][old].items():
            assert torch.equal(r_sd["state"][new][key], v)
    assert sorted(z_sd["state"]) == [0, 1, 2, 3, 6, 7]  # bn.weight / bn.bias (4, 5 in the new order) dropped


def _diff_json(a: str, b: str, lazy: bool, **kw: Any) -> str:
    from optckpt import io
    from optckpt.diff import diff_checkpoints
    from optckpt.render import to_json

    return to_json(diff_checkpoints(io.load(a, lazy=lazy), io.load(b, lazy=lazy), **kw).as_json())


def test_diff_reads_lazily_what_it_reads_eagerly(tmp_path: Path) -> None:
    """The same report whether tensors are compared in the files' mappings or as torch tensors: identical
    files, changed values (numeric figures from torch), renames found by content, --stats."""
    src = tmp_path / "a.pt"
    ck = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    torch.save(ck, src)
    ck["model"]["conv.weight"] = ck["model"]["conv.weight"] + 1e-3
    ck["model"]["renamed.bias"] = ck["model"].pop("conv.bias")
    ck["optimizer"]["state"][2]["exp_avg"] = ck["optimizer"]["state"][2]["exp_avg"].t()  # a strided view
    changed = tmp_path / "b.pt"
    torch.save(ck, changed)
    pairs = [(FIXTURES / "bundle.pt", src), (src, changed), (FIXTURES / "per_layer_lr.pth", FIXTURES / "bundle.pt")]
    for a, b in pairs:
        for kw in ({}, {"stats": True}, {"atol": 1e-2}):
            assert _diff_json(str(a), str(b), True, **kw) == _diff_json(str(a), str(b), False, **kw), (a, b, kw)


def test_diff_of_identical_files_imports_no_torch(tmp_path: Path) -> None:
    import shutil

    shutil.copy(FIXTURES / "bundle.pt", tmp_path / "a2.pt")
    code = ("import sys, optckpt\n"
            "r = optckpt.diff(sys.argv[1], sys.argv[2])\n"
            "assert r.exit_code == 0, r.data\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = _no_torch(code, str(FIXTURES / "bundle.pt"), str(tmp_path / "a2.pt"))
    assert r.returncode == 0, r.stderr[-2000:]


def test_verify_torch_reads_the_output_back_with_torch(tmp_path: Path) -> None:
    """``--verify-torch``: the same output, verified by a torch.load read-back; with --no-verify a usage
    error (exit 2)."""
    names = tmp_path / "names.json"
    names.write_text('["conv2.weight", "conv2.bias", "conv.weight", "conv.bias", "bn.weight", "bn.bias", '
                     '"classifier.weight", "classifier.bias"]')
    env = {**os.environ, "PYTHONPATH": ROOT}
    outs = []
    for extra in ([], ["--verify-torch"]):
        out = tmp_path / f"out{len(outs)}.pt"
        r = subprocess.run([sys.executable, "-m", "optckpt", "remap", str(FIXTURES / "bundle.pt"), "--target",
                            str(names), "-o", str(out), *extra], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(torch.load(out, weights_only=True))
    _same(outs[0], outs[1], {}, {})
    r = subprocess.run([sys.executable, "-m", "optckpt", "set", str(FIXTURES / "bundle.pt"), "--lr", "0.1", "-o",
                        str(tmp_path / "x.pt"), "--verify-torch", "--no-verify"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "contradict" in r.stderr and not (tmp_path / "x.pt").exists()


def test_verify_torch_is_a_torch_load_and_the_default_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optckpt

    calls: list[str] = []
    real = torch.load

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(str(a[0]))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", counting)
    optckpt.set_hparams(str(FIXTURES / "bundle.pt"), str(tmp_path / "a.pt"), lr=0.1)
    assert calls == []
    optckpt.set_hparams(str(FIXTURES / "bundle.pt"), str(tmp_path / "b.pt"), lr=0.1, verify="torch")
    assert len(calls) == 1 and "b.pt" in calls[0]


@pytest.mark.parametrize("in_place", [False, True], ids=["output", "in-place"])
def test_lbfgs_remap_with_a_names_file_mixes_record_and_real_tensors(tmp_path: Path, in_place: bool) -> None:
    """A names-file remap of LBFGS reads lazily but permutes the flat history with torch: the object
    written holds record references and real tensors, goes through torch's pickler, and is verified
    bit for bit (not by the record check, which would see a tensor of another kind read back)."""
    import optckpt

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.LBFGS(m.parameters(), history_size=3)
    x = torch.randn(8, 3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    src = tmp_path / "lb.pt"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, src)
    names = [n for n, _ in m.named_parameters()]
    target = tmp_path / "names.json"
    target.write_text(json.dumps(names[2:] + names[:2]))
    before = torch.load(src, weights_only=True)["optimizer"]["state"][0]
    out = src if in_place else tmp_path / "out.pt"
    optckpt.remap(str(src), str(target), None if in_place else str(out), in_place=in_place)
    after = torch.load(out, weights_only=True)["optimizer"]["state"][0]
    sizes = [p.numel() for p in m.parameters()]
    for key in ("d", "prev_flat_grad"):
        pieces = list(torch.split(before[key], sizes))
        assert torch.equal(after[key], torch.cat(pieces[2:] + pieces[:2])), key


def test_a_record_copied_wrong_fails_the_verification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose copy differs from its source (one byte flipped after copy_file_range) is caught
    by the verification of own-pickler output; nothing is written."""
    import optckpt
    from optckpt.errors import WriteError
    from optckpt.io import records

    real = records._copy_range

    def corrupting(src_fd: int, dst_fd: int, src_off: int, dst_off: int, size: int) -> None:
        real(src_fd, dst_fd, src_off, dst_off, size)
        if size >= 16:
            byte = os.pread(src_fd, 1, src_off + 8)
            os.pwrite(dst_fd, bytes([byte[0] ^ 0xFF]), dst_off + 8)

    monkeypatch.setattr(records, "_copy_range", corrupting)
    out = tmp_path / "out.pt"
    with pytest.raises(WriteError, match="verification failed"):
        optckpt.set_hparams(str(FIXTURES / "bundle.pt"), str(out), lr=0.1)
    assert not out.exists()


def test_ties_found_from_record_references_are_the_eager_readers(tmp_path):
    """``tied_keys`` reads a record reference's storage, offset, shape, strides and dtype directly:
    the same ties as from the real tensors (a view of the same storage, a clone and empty tensors are
    no ties)."""
    w = torch.randn(4, 3)
    sd = {"emb.weight": w, "head.weight": w, "view": w[1:], "t": w.t(), "other": w.clone(),
          "as_half": w.half(), "empty": torch.zeros(0), "empty2": torch.zeros(0), "again": w.view(4, 3)}
    torch.save({"model": sd}, tmp_path / "tie.pt")
    lazy, eager = optckpt_io.load(str(tmp_path / "tie.pt"), lazy=True), optckpt_io.load(str(tmp_path / "tie.pt"))
    assert lazy.models[0].tied == eager.models[0].tied == {"head.weight": "emb.weight", "again": "emb.weight"}


def test_the_inlined_view_rules_decide_as_the_generic_ones():
    """``_rebuild_tensor_v2``'s stand-in spells the view rules out for 0-, 1- and 2-d tensors: on
    random views (bools and floats for ints, negative sizes / strides / offsets, zero sizes, views
    reaching past the storage, expanded views over the limit, ragged storages) it accepts exactly
    what the generic rules (``_lazy_tensor``) accept, with the same result."""
    from collections import OrderedDict

    from optckpt.io import reader
    from optckpt.tensors import RecordSource

    src = RecordSource("x.pt", 1 << 40)
    v2 = reader._lazy_table(src)[("torch._utils", "_rebuild_tensor_v2")]
    rng = random.Random(7)
    ints = [0, 1, 2, 3, 5, 8, -1, True, False, 1.0, 1 << 30, 1 << 62]
    outcomes = {"same": 0, "refused": 0}
    for _ in range(20_000):
        dims = rng.choice([0, 1, 2, 2, 3])
        size = tuple(rng.choice(ints) for _ in range(dims))
        stride = tuple(rng.choice(ints) for _ in range(dims if rng.random() < 0.9 else dims + 1))
        offset = rng.choice([0, 0, 1, 7, -1, True, 1 << 40])
        dtype = DTYPES[rng.choice(["float32", "uint8", "float64", "bfloat16"])]
        nbytes = rng.choice([0, 1, 4, 6, 64, 256, 4096, 1 << 20])
        st = tuple.__new__(reader._LazyStorage, ("k", 64, nbytes, dtype, "cpu", "FloatStorage"))
        got: Any
        want: Any
        try:
            got = v2(st, offset, size, stride, False, OrderedDict())
        except NeedsTorch:
            got = None
        try:
            want = reader._lazy_tensor(src, st, offset, size, stride, False, OrderedDict(), dtype, None)
        except NeedsTorch:
            want = None
        if want is None:
            assert got is None, (size, stride, offset, nbytes, dtype)
            outcomes["refused"] += 1
        else:
            assert got is not None, (size, stride, offset, nbytes, dtype)
            assert (got.shape, got.stride(), got.storage_offset(), got.dtype, got.storage_nbytes) == \
                (want.shape, want.stride(), want.storage_offset(), want.dtype, want.storage_nbytes)
            outcomes["same"] += 1
    assert outcomes["same"] > 1000 and outcomes["refused"] > 1000, outcomes


def test_has_record_tensors_finds_them_anywhere_and_any_real_tensor_beside_them(tmp_path: Path) -> None:
    from collections import OrderedDict

    from optckpt.tensors import has_record_tensors

    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    rt = _lazy(tmp_path / "w.pt")["w"]
    assert type(rt) is RecordTensor
    deep = {"a": [1, 2.0, "x", None, (3, [OrderedDict(k=[{"z": rt}])])]}
    assert has_record_tensors([deep]) and has_record_tensors([deep], only=True)
    assert not has_record_tensors([{"a": [1, 2, (3, "x")], "b": OrderedDict(c=None)}])
    assert not has_record_tensors([{"a": list(range(1000))}], only=True)
    mixed = {"a": [rt, 1], "b": {"c": (torch.zeros(1),)}}
    assert has_record_tensors([mixed]) and not has_record_tensors([mixed], only=True)
    assert not has_record_tensors([[torch.zeros(1)]]) and not has_record_tensors([[torch.zeros(1)]], only=True)
    assert has_record_tensors([[1, 2], rt], only=True)


def test_reading_leaves_no_cyclic_garbage() -> None:
    """The lazy reader and the zip parse free what they built by reference counts alone: a cycle
    through the unpickler would keep its memo (every object of the pickle) alive until a cyclic
    collection, which commands over big checkpoints pause."""
    import gc

    from optckpt import io as oio

    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        ck = oio.load(str(FIXTURES / "bundle.pt"), lazy=True)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
        assert not kinds & {"_LazyUnpickler", "_LazyStorage", "_Cols", "ZipEntry", "RecordTensor"}, kinds
        assert len(gc.garbage) < 100, len(gc.garbage)
        del ck
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()


def test_view_rule_agrees_with_torchs_set_():
    """``view_inside`` (the lazy reader's rule for the views it reads, ``RecordTensor.view_of``'s for
    those it makes) accepts exactly the int views torch's ``set_`` accepts on a 6-element storage that
    cannot grow (as a memory-mapped file's), and no view of floats or bools (torch's weights-only
    reader gives those to its own code)."""
    from optckpt.tensors import view_inside

    storage = torch.frombuffer(bytearray(24), dtype=torch.float32).untyped_storage()
    assert not storage.resizable()
    cases = 0
    for offset in (0, 1, 5, 6, 7):
        for shape in ((), (0,), (1,), (2,), (3,), (6,), (7,), (2, 3), (3, 2), (2, 0), (1, 1, 6)):
            for stride in {(), (1,), (2,), (0,), (3, 1), (1, 2), (2, 1), (0, 1), (6, 6, 1), (1, 1)}:
                if len(stride) != len(shape):
                    continue
                try:
                    torch.empty(0).set_(storage, offset, shape, stride)
                    ok = True
                except RuntimeError:
                    ok = False
                assert view_inside(offset, shape, stride, 6) == ok, (offset, shape, stride)
                cases += 1
    assert cases > 60
    assert not view_inside(0, (2.0,), (1,), 6) and not view_inside(0, (True,), (1,), 6)
    assert not view_inside(0, (2,), (-1,), 6) and not view_inside(-1, (1,), (1,), 6)
    assert not view_inside(0.0, (2,), (1,), 6) and not view_inside(0, (2,), (1, 1), 6)


@pytest.mark.parametrize("field", ["key", "storage_nbytes", "_offset", "shape", "_stride", "dtype", "requires_grad",
                                   "is_parameter"])
def test_every_tensor_field_that_differs_is_named_where_it_is(tmp_path: Path, field: str) -> None:
    """The verification's structure comparison finds a tensor read back that differs in any one field,
    in a state entry (compared in place) as in a list (compared from the stack), and names its path."""
    import copy

    from optckpt.io.lazypickle import same_structure
    from optckpt.tensors import DTYPES

    src = tmp_path / "s.pt"
    torch.save({"state": {0: {"exp_avg": torch.ones(2, 3), "step": torch.tensor(1.0)}},
                "rows": [torch.zeros(4), torch.ones(2)]}, src)
    got = _lazy(src)
    for path in (("state", 0, "exp_avg"), ("rows", 1)):
        written = copy.copy(got)
        written["state"] = {0: dict(got["state"][0])}
        written["rows"] = list(got["rows"])
        holder = written[path[0]] if len(path) == 2 else written[path[0]][path[1]]
        t = holder[path[-1]]
        other = RecordTensor(t.source, t.key, t.data_offset, t.storage_nbytes, t.dtype, t.shape, t.stride(),
                             t.storage_offset(), t.requires_grad, t.location, t.storage_type)
        other.is_parameter = t.is_parameter
        changed = {"key": "99", "storage_nbytes": t.storage_nbytes + 4, "_offset": 1, "shape": (3, 2) if t.ndim == 2
                   else (1,), "_stride": (1, 2) if t.ndim == 2 else (2,), "dtype": DTYPES["float16"],
                   "requires_grad": True, "is_parameter": True}[field]
        setattr(other, field, changed)
        holder[path[-1]] = other
        assert same_structure(got, got, lambda x: x.key) is None
        said = same_structure(written, got, lambda x: x.key)
        assert said is not None and said.startswith("(root)" + "".join(f"[{k!r}]" for k in path)), said
