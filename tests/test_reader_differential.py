"""optckpt's own torch-zip reader against ``torch.load(weights_only=True)``: for every fixture and a
generated corpus (nested containers, views with offsets and strides, shared and tied storages, every
dtype torch saves, empty and 0-d tensors, parameters), the same objects — values bit for bit, dtype,
shape, stride, storage offset, storage sharing, container types; and every pickle torch's
weights-only load refuses, this reader refuses too (it hands the file to the placeholder reader)."""

from __future__ import annotations

import pickle
import random
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from optckpt.io import torchfile
from optckpt.io.reader import NeedsPlaceholders, _Unpickler, fast_allowed, read_zip_pickle
from optckpt.io.safepickle import safe_load_torch

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
           torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
           torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _bytes_of(t: torch.Tensor) -> bytes:
    s = t.untyped_storage()
    return bytes(s[: s.nbytes()]) if s.nbytes() else b""


def _same(a: Any, b: Any, sa: dict[int, int], sb: dict[int, int], where: str = "root") -> None:
    """``a`` (ours) is ``b`` (torch's): types, structure, tensors down to their storage bytes, and
    storage sharing (the k-th distinct storage of one is the k-th of the other)."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset(), a.requires_grad) == \
               (b.dtype, b.shape, b.stride(), b.storage_offset(), b.requires_grad), where
        assert _bytes_of(a) == _bytes_of(b), f"{where}: storage bytes differ"
        if a.untyped_storage().nbytes():
            ka, kb = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
            assert sa.setdefault(ka, len(sa)) == sb.setdefault(kb, len(sb)), f"{where}: storage sharing differs"
        return
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        assert getattr(a, "__dict__", None) == getattr(b, "__dict__", None), where
        for k in a:
            _same(a[k], b[k], sa, sb, f"{where}[{k!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, sa, sb, f"{where}[{i}]")
        return
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
        return
    assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"


def _ours(path: Path) -> Any:
    checked = torchfile._check_zip(str(path))
    assert checked.fast
    return read_zip_pickle(str(path), checked.layout, checked.pickle, checked.prefix, fast_allowed(), {})


def _fixture_files() -> list[Path]:
    out = []
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".tar") and torchfile.sniff(str(p)) == "zip":
            out.append(p)
    return out


@pytest.mark.parametrize("path", _fixture_files(), ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_fixture_reads_as_torch_reads_it(path: Path) -> None:
    try:
        expected = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError:
        # beyond torch's table: numpy arrays are read as data (the safe reader's allowlist), anything
        # else stops this reader; either way, what the placeholder reader reads
        expected = safe_load_torch(str(path), lambda s, loc: s, zip_format=True)
        try:
            ours = _ours(path)
        except NeedsPlaceholders:
            return
        _same(ours, expected, {}, {})
        return
    _same(_ours(path), expected, {}, {})


def _tensor(rng: random.Random, dtype: torch.dtype) -> torch.Tensor:
    shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
    g = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    if dtype.is_floating_point and dtype.itemsize >= 2 or dtype.is_complex:
        t = torch.randn(shape, generator=g, dtype=dtype)
    elif dtype is torch.bool:
        t = torch.rand(shape, generator=g) > 0.5
    elif dtype.is_floating_point:  # float8: from float32
        t = torch.randn(shape, generator=g).to(dtype)
    else:
        hi = 100 if dtype in (torch.int8, torch.uint8) else 1000
        t = torch.randint(0, hi, shape, generator=g).to(dtype)
    kind = rng.randint(0, 5)
    if kind == 1 and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]  # a view with a storage offset
    elif kind == 2 and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous strides
    elif kind == 3 and t.dim() >= 1 and t.shape[-1] > 2:
        t = t[..., ::2]
    elif kind == 4:
        t = t.expand(3, *t.shape) if t.numel() < 8 else t  # stride 0
    return t


def _corpus_object(rng: random.Random, depth: int, pool: list[torch.Tensor]) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.35:
        choice = rng.randint(0, 9)
        if choice <= 4:
            t = _tensor(rng, rng.choice(_DTYPES))
            pool.append(t)
            return t
        if choice == 5 and pool:
            base = rng.choice(pool)
            return base if rng.random() < 0.5 else base.view(-1)[: max(base.numel() // 2, 0)] \
                if base.is_contiguous() else base  # tied, or another view of the same storage
        if choice == 6:
            return torch.nn.Parameter(torch.randn(rng.randint(1, 3)), requires_grad=rng.random() < 0.5)
        return rng.choice([3, -1.5, float("inf"), "name", b"raw", None, True, 2 + 3j, torch.Size([2, 3]),
                           torch.float16, torch.device("cpu"), bytearray(b"ab"), {1, 2}])
    n = rng.randint(0, 4)
    kind = rng.randint(0, 4)
    items = [_corpus_object(rng, depth + 1, pool) for _ in range(n)]
    if kind == 0:
        return items
    if kind == 1:
        return tuple(items)
    if kind == 2:
        return {f"k{i}": v for i, v in enumerate(items)}
    if kind == 3:
        od: OrderedDict[Any, Any] = OrderedDict((i, v) for i, v in enumerate(items))
        if rng.random() < 0.3:
            od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
        return od
    return Counter({f"c{i}": i for i in range(n)})


@pytest.mark.parametrize("seed", range(40))
def test_generated_corpus_reads_as_torch_reads_it(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    obj = {"payload": _corpus_object(rng, 0, []), "many": [torch.tensor(float(i)) for i in range(50)]}
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    _same(_ours(path), torch.load(path, weights_only=True, mmap=True), {}, {})


def test_shared_and_tied_storages_and_empty_tensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32)
    obj = {"a": base, "b": base[3:7], "c": base.view(3, 4).t(), "e": torch.empty(0, 5), "z": torch.tensor(1),
           "tied": base, "e2": torch.empty(0, dtype=torch.int64)}
    path = tmp_path / "s.pt"
    torch.save(obj, path)
    ours = _ours(path)
    _same(ours, torch.load(path, weights_only=True, mmap=True), {}, {})
    assert ours["a"].untyped_storage().data_ptr() == ours["b"].untyped_storage().data_ptr()


class _Evil:
    def __reduce__(self) -> Any:
        import os

        return (os.getcwd, ())


@pytest.mark.parametrize("payload", [
    _Evil(),
    {"ns": __import__("argparse").Namespace(lr=1)},
    [torch.zeros(2), __import__("datetime").date(2020, 1, 1)],
], ids=["call", "object", "date"])
def test_what_torch_refuses_this_reader_hands_to_the_placeholder_reader(tmp_path: Path, payload: Any) -> None:
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(NeedsPlaceholders):
        _ours(path)
    loaded = torchfile.load_torch_file(str(path))
    assert loaded.placeholders


def _pickle_bytes_with(opcodes: bytes) -> bytes:
    return b"\x80\x02" + opcodes + b"."


@pytest.mark.parametrize("body", [
    b"cos\nsystem\n",  # GLOBAL os.system
    b"cbuiltins\neval\n",
    b"ctorch\nload\n",
    b"ctorch._utils\n_rebuild_tensor_v2x\n",
    b"c__builtin__\ngetattr\n",
], ids=["os.system", "eval", "torch.load", "near-name", "getattr"])
def test_every_other_global_stops_the_fast_reader(body: bytes) -> None:
    with pytest.raises(NeedsPlaceholders):
        _Unpickler(_pickle_bytes_with(body), fast_allowed(), lambda *a: None, "f.pt").checked_load()


def test_backward_hooks_in_a_tensor_pickle_are_refused(tmp_path: Path) -> None:
    """torch.save writes every tensor's hooks as an empty OrderedDict; a file with hooks is not its own."""
    path = tmp_path / "h.pt"
    torch.save({"w": torch.zeros(2)}, path)
    data = path.read_bytes()
    checked = torchfile._check_zip(str(path))
    pkl = checked.pickle
    # the empty hooks dict: ``collections OrderedDict`` then EMPTY_TUPLE REDUCE; give it an item
    i = pkl.index(b"OrderedDict")
    j = pkl.index(b")R", i)
    hooked = pkl[: j + 2] + b"K\x01K\x02s" + pkl[j + 2:]  # d[1] = 2
    with pytest.raises(pickle.UnpicklingError, match="backward hooks"):
        read_zip_pickle(str(path), checked.layout, hooked, checked.prefix, fast_allowed(), {})
    assert path.read_bytes() == data


def test_load_torch_file_does_not_go_through_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is the path: a plain state dict is read without torch.load."""
    path = tmp_path / "p.pt"
    torch.save({"model": {"w": torch.ones(3)}, "optimizer": {"state": {}, "param_groups": []}}, path)

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    got = torchfile.load_torch_file(str(path))
    assert torch.equal(got.obj["model"]["w"], torch.ones(3)) and got.saved_locations == ("cpu",)
