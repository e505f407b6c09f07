"""DeepSpeed ZeRO directories read lazily (record references, torch not imported) against the eager read.

Metadata commands (``inspect``, ``check`` against names) read a ZeRO directory with the lazy reader:
the flat partitions are record references and the per-parameter pieces cut from them are views of
the same records. What they describe (names, order, dtype, shape, requires_grad) is what the eager
read gives, and their values, once materialised, are the eager read's bit for bit, on every committed
ZeRO fixture (stages 1-3, one and two ranks, bf16). A piece split between two ranks' partitions is
joined by torch (the only tensor math of the read). The committed optimizer files pickle DeepSpeed's
own objects: the lazy placeholder reader reads them (inert placeholders, record references, no torch)
but stage 3's, whose flat groups go to torch (``_rebuild_from_type_v2``); copies without those objects
are read by the lazy reader itself. Edits of a lazily read directory write what the same edit of an
eagerly read one writes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES, ROOT, run_cli
from test_deepspeed import _plain, _Stub

from optckpt.inspect import inspect_checkpoint
from optckpt.io import load
from optckpt.io.deepspeed import _Flat
from optckpt.io.torchfile import load_torch_file
from optckpt.tensors import RecordTensor, is_tensor, materialize

DIRS = [FIXTURES / "zero_ckpts" / f"stage{s}" for s in (1, 2, 3)] + \
    [FIXTURES / "zero_ckpts_more" / kind / f"stage{s}" for kind in ("w2", "bf16") for s in (1, 2, 3)]
IDS = [f"{p.parent.name}-{p.name}" for p in DIRS]


def _stripped(src: Path, dst: Path) -> Path:
    """A copy of the ZeRO directory ``src`` whose optimizer files hold no DeepSpeed object (each
    replaced by None): files the lazy reader models whole."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _Stub if module.startswith("deepspeed") else super().find_class(module, name)

    shutil.copytree(src, dst)
    pm = types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="pickle")
    for f in dst.rglob("*optim_states.pt"):
        torch.save(_plain(torch.load(f, weights_only=False, pickle_module=pm)), f)
    return dst


def _same(lazy: Any, eager: Any, where: str = "") -> int:
    """Equal structure; every tensor of the lazy read describes the eager one and holds its values."""
    if is_tensor(lazy) or is_tensor(eager):
        assert is_tensor(lazy) and isinstance(eager, torch.Tensor), where
        assert (tuple(lazy.shape), str(lazy.dtype), lazy.requires_grad) == \
            (tuple(eager.shape), str(eager.dtype), eager.requires_grad), where
        real = materialize(lazy)
        assert isinstance(real, torch.Tensor) and real.dtype == eager.dtype and torch.equal(real, eager), where
        return 1
    if isinstance(lazy, dict):
        assert isinstance(eager, dict) and list(lazy) == list(eager), where
        return sum(_same(lazy[k], eager[k], f"{where}/{k}") for k in lazy)
    if isinstance(lazy, (list, tuple)):
        assert isinstance(eager, (list, tuple)) and len(lazy) == len(eager), where
        return sum(_same(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(lazy, eager)))
    assert lazy == eager, (where, lazy, eager)
    return 0


def _records(obj: Any) -> list[RecordTensor]:
    out: list[RecordTensor] = []
    stack = [obj]
    while stack:
        v = stack.pop()
        if type(v) is RecordTensor:
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


def _compare(d: Path) -> tuple[Any, Any]:
    lazy, eager = load(d, lazy=True), load(d)
    assert (lazy.layout, lazy.extras) == (eager.layout, eager.extras)
    assert [m.part for m in lazy.models] == [m.part for m in eager.models]
    n = _same(lazy.optimizer().state_dict, eager.optimizer().state_dict, "optimizer")
    n += _same(dict(lazy.models[0].tensors), dict(eager.models[0].tensors), "module")
    assert n > 0
    assert lazy.models[0].meta == eager.models[0].meta
    assert inspect_checkpoint(lazy) == inspect_checkpoint(eager)  # what inspect reports: the same
    return lazy, eager


@pytest.mark.parametrize("d", DIRS, ids=IDS)
def test_lazy_read_of_the_committed_fixtures_equals_the_eager_read(d):
    lazy, _ = _compare(d)
    # the model states file (param_shapes, module) is read lazily, and so are the optimizer files with
    # DeepSpeed's objects in them (inert placeholders) but stage 3's (its flat groups: torch's)
    model_part = next(p for p in lazy.parts if "model_states" in p.relpath)
    assert _records(model_part.obj) and not any(isinstance(t, torch.Tensor) for t in model_part.obj["module"].values())
    for p in lazy.parts:
        if "optim_states" in p.relpath:
            assert bool(_records(p.obj)) == (d.name != "stage3"), p.relpath
            assert any(isinstance(t, torch.Tensor) for t in _flat_values(p.obj)) == (d.name == "stage3"), p.relpath


@pytest.mark.parametrize("d", DIRS, ids=IDS)
def test_lazy_read_without_deepspeed_objects_equals_the_eager_read(d, tmp_path):
    """Every file read lazily: the partitions and the state cut from them are record references, but
    for a piece that spans two ranks' partitions (joined by torch). (Stage 3's flat groups are pickled
    through ``torch._tensor._rebuild_from_type_v2``, which the lazy reader leaves to torch: its
    optimizer files are read the torch way, the model states file lazily.)"""
    lazy, _ = _compare(_stripped(d, tmp_path / "s"))
    if d.name == "stage3":
        return
    assert all(p.obj is not None and not any(isinstance(t, torch.Tensor) for t in _flat_values(p.obj))
               for p in lazy.parts)
    pieces = [v for st in lazy.optimizer().state.values() for v in st.values() if is_tensor(v) and v.numel() > 1]
    assert pieces and any(type(v) is RecordTensor for v in pieces)
    if "w2" not in str(d) and "bf16" not in str(d):  # one rank: nothing is joined
        assert all(type(v) is RecordTensor for v in pieces)
        assert all(type(v) is RecordTensor for v in lazy.models[0].tensors.values())


def _flat_values(obj: Any) -> list[Any]:
    out, stack = [], [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            out.append(v)
    return out


def test_flat_views_are_record_views_and_a_split_piece_is_joined(tmp_path):
    """``_Flat`` over two record references: a piece inside one is a view of that record (no torch
    math); a piece across both is the two joined; the views equal torch's narrow / view."""
    a, b = torch.arange(10, dtype=torch.float32), torch.arange(100, 106, dtype=torch.float32)
    torch.save({"a": a, "b": b[::2]}, tmp_path / "f.pt")  # b: a strided view (every second element)
    got = load_torch_file(str(tmp_path / "f.pt"), lazy=True).obj
    assert type(got["a"]) is RecordTensor and type(got["b"]) is RecordTensor and got["b"].stride() == (2,)
    flat = _Flat([got["a"], got["b"]])
    eager = torch.cat([a, b[::2]])
    assert flat.numel() == 13
    inside = flat.view(2, 6, (2, 3))
    assert type(inside) is RecordTensor and torch.equal(materialize(inside), eager[2:8].view(2, 3))
    assert (inside.stride(), inside.storage_offset()) == (a.narrow(0, 2, 6).view(2, 3).stride(), 2)
    strided = flat.view(11, 2, (2, 1))
    want = b[::2].narrow(0, 1, 2).view(2, 1)
    assert type(strided) is RecordTensor and (strided.stride(), strided.storage_offset()) == \
        (want.stride(), want.storage_offset())
    assert torch.equal(materialize(strided), want)
    across = flat.view(8, 4, (2, 2))
    assert isinstance(across, torch.Tensor) and torch.equal(across, eager[8:12].view(2, 2))
    empty = flat.empty((0, 4))
    assert type(empty) is RecordTensor and empty.shape == (0, 4) and empty.stride() == a[:0].view(0, 4).stride()
    part = flat.span(9, 3)
    assert [p.numel() for p in part.parts] == [1, 2] and all(type(p) is RecordTensor for p in part.parts)
    with pytest.raises(ValueError):
        got["a"].view_of(5, (6,), (1,))  # past the record: refused as torch's set_ refuses it


def test_inspect_of_a_zero_dir_imports_no_torch(tmp_path):
    """``inspect`` (table and JSON) of a ZeRO directory whose files the lazy reader models: torch is never
    imported, also with many declared zero-size parameters."""
    d = _stripped(FIXTURES / "zero_ckpts" / "stage2", tmp_path / "s")
    step = d / "global_step3"
    sd = torch.load(step / "mp_rank_00_model_states.pt", weights_only=True)
    for i in range(500):
        sd["param_shapes"][0][f"empty.{i}"] = torch.Size([0, 4])
    torch.save(sd, step / "mp_rank_00_model_states.pt")
    optim = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    osd = torch.load(optim, weights_only=True)
    osd["optimizer_state_dict"]["param_alignment_paddings"][0] += [0] * 500
    torch.save(osd, optim)
    code = ("import sys\n"
            "from optckpt.cli import main\n"
            "sys.argv = ['optckpt', 'inspect', sys.argv[1], '--format', sys.argv[2]]\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for fmt in ("json", "table"):
        r = subprocess.run([sys.executable, "-c", code, str(d), fmt], capture_output=True, text=True, timeout=120,
                           cwd=ROOT, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        if fmt == "json":
            opt = json.loads(r.stdout)["optimizers"][0]
            assert (opt["name_evidence"], opt["num_params"], opt["num_with_state"]) == ("deepspeed", 504, 504)
            by_name = {e["index"]: e for e in opt["entries"]}
            assert by_name["empty.7"]["state"] == {"step": 3.0, "exp_avg": [0, 4], "exp_avg_sq": [0, 4]}
            assert by_name["0.weight"]["state"] == {"step": 3.0, "exp_avg": [7, 5], "exp_avg_sq": [7, 5]}
        else:
            assert "AdamW, 504 params in 2 groups, 504 with state" in r.stdout, r.stdout[:2000]


REORDERED = [["2.weight", "0.weight"], ["2.bias", "0.bias"]]
CODE = '''
import torch

def reordered():
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    groups = [{"params": [m[2].weight, m[0].weight]},
              {"params": [m[2].bias, m[0].bias], "weight_decay": 0.0}]
    return m, torch.optim.AdamW(groups, lr=1e-2)
'''


def _written(out: Path) -> dict[str, Any]:
    ck = load(out)
    return {os.path.basename(p.relpath): p.obj for p in ck.parts if p.kind == "torch"}


EDITED = [1, 2, 4, 5, 6]  # stages 2 and 3 of one rank, of two ranks, and bf16 ZeRO 1 on two ranks


@pytest.mark.parametrize("d", [DIRS[i] for i in EDITED], ids=[IDS[i] for i in EDITED])
def test_edit_of_a_lazily_read_zero_dir_writes_what_the_eager_edit_writes(d, tmp_path):
    """``remap`` against a names file reads the directory lazily (the model states file as record
    references); against code, eagerly. Both write the same files, tensors bit for bit; ``set`` (lazy)
    writes the new lr (and passes its own verification)."""
    src = tmp_path / "src"
    shutil.copytree(d, src)
    (tmp_path / "names.json").write_text(json.dumps(REORDERED))
    (tmp_path / "targets.py").write_text(CODE)
    r = run_cli("remap", str(src), "--target", str(tmp_path / "names.json"), "-o", str(tmp_path / "lazy"))
    assert r.returncode == 0, r.stderr
    r = run_cli("remap", str(src), "--target", f"{tmp_path / 'targets.py'}:reordered", "-o", str(tmp_path / "eager"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lazy, eager = _written(tmp_path / "lazy"), _written(tmp_path / "eager")
    assert list(lazy) == list(eager)
    assert _same(lazy, eager) > 0  # (placeholders compare structurally)
    r = run_cli("set", str(src), "--scale-lr", "0.5", "-o", str(tmp_path / "set"))
    assert r.returncode == 0, r.stderr
    got = load(tmp_path / "set").optimizer()
    assert [g["lr"] for g in got.state_dict["param_groups"]] == \
        [g["lr"] * 0.5 for g in load(src).optimizer().state_dict["param_groups"]]


def test_a_lazily_read_zero_dir_is_materialised_for_an_edit(tmp_path):
    """What an edit of a ZeRO directory starts from (``zero_edit._materialize``): every record reference
    of the files and of the state cut from them a real tensor, equal to the eager read's."""
    from optckpt.zero_edit import _materialize

    d = _stripped(FIXTURES / "zero_ckpts_more" / "w2" / "stage2", tmp_path / "s")
    lazy, eager = load(d, lazy=True), load(d)
    assert _records([p.obj for p in lazy.parts]) and _records(lazy.optimizer().state_dict)
    _materialize(lazy)
    assert not _records([p.obj for p in lazy.parts]) and not _records(lazy.optimizer().state_dict)
    assert not _records(dict(lazy.models[0].tensors))
    assert _same([p.obj for p in lazy.parts], [p.obj for p in eager.parts]) > 0
    assert _same(lazy.optimizer().state_dict, eager.optimizer().state_dict) > 0
