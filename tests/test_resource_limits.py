"""Work bounded by the input: small crafted files that would make a tree walk, a read or a parse
explode are refused with one line naming the limit; big but real structures keep working."""

from __future__ import annotations

import io
import json
import struct
import sys
import zipfile

import pytest
import torch
from conftest import FIXTURES, invoke
from test_security_placeholders import SLOT, _splice

GOOD = FIXTURES / "bundle.pt"
TARGET = str(FIXTURES / "models.py") + ":build_cnn"


def _commands(p: str, tmp_path) -> list[list[str]]:
    o = str(tmp_path / "out.pt")
    return [["inspect", p], ["inspect", p, "--stats"], ["check", p, "--target", TARGET],
            ["remap", p, "--target", TARGET, "-o", o], ["set", p, "--scale-lr", "0.5", "-o", o],
            ["reset", p, "--params", "*", "-o", o], ["diff", p, str(GOOD)],
            ["convert", p, "--to", "torch", "-o", str(tmp_path / "c.pt")]]


def _refused_everywhere(path, tmp_path, needle: str) -> None:
    for cmd in _commands(str(path), tmp_path):
        r = invoke(*cmd)
        assert r.exit_code == 2, (cmd, r.stdout[-300:], r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (cmd, r.stderr)
        assert not (tmp_path / "out.pt").exists() and not (tmp_path / "c.pt").exists()


def _good() -> dict:
    return torch.load(GOOD, weights_only=True)


def test_billion_laughs_is_refused(tmp_path):
    a: list = [1]
    for _ in range(25):
        a = [a] * 40  # 40^25 entries as a tree, 1 KB of pickle
    torch.save({**_good(), "laughs": a}, tmp_path / "laughs.pt")
    _refused_everywhere(tmp_path / "laughs.pt", tmp_path, "billion laughs")
    g = _good()
    g["optimizer"]["param_groups"][0]["junk"] = a  # inside what every command walks
    torch.save(g, tmp_path / "in_group.pt")
    _refused_everywhere(tmp_path / "in_group.pt", tmp_path, "billion laughs")


def test_reference_cycles_and_deep_nesting_are_refused(tmp_path):
    cyc: list = []
    cyc.append(cyc)
    torch.save({**_good(), "cycle": cyc}, tmp_path / "cycle.pt")
    _refused_everywhere(tmp_path / "cycle.pt", tmp_path, "reference cycle")
    deep: dict = {"w": 1}
    for _ in range(2000):
        deep = {"x": deep}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        torch.save({**_good(), "deep": deep}, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    _refused_everywhere(tmp_path / "deep.pt", tmp_path, "nested deeper than 256 levels")


def test_shared_references_that_do_not_amplify_still_load(tmp_path):
    """torch's own param groups share one ``betas`` tuple; a config dict referenced twice is fine."""
    shared = {"note": "same dict twice", "values": list(range(100))}
    g = _good()
    g["a"], g["b"] = shared, shared
    torch.save(g, tmp_path / "shared.pt")
    r = invoke("inspect", str(tmp_path / "shared.pt"))
    assert r.exit_code == 0, r.stderr


def test_stride_zero_views_of_tiny_storages_are_refused(tmp_path):
    t = torch.ones(1).expand(1_000_000_000)  # 4 bytes in the file, 4 GB once read
    torch.save({"model": {"w": t}, "optimizer": {"state": {0: {"exp_avg": t, "step": torch.tensor(1.0)}},
                                                 "param_groups": [{"lr": 0.1, "params": [0]}]}}, tmp_path / "s0.pt")
    _refused_everywhere(tmp_path / "s0.pt", tmp_path, "would materialise")
    small = torch.zeros(1, 8).expand(4, 8)  # a real expanded buffer (position_ids-like): fine
    torch.save({"model": {"w": torch.ones(2), "ids": small}}, tmp_path / "ok.pt")
    assert invoke("inspect", str(tmp_path / "ok.pt")).exit_code == 0


def test_compressed_records_are_refused(tmp_path):
    """torch.save stores records; a deflated data.pkl would inflate unbounded (a zip bomb)."""
    buf = io.BytesIO()
    torch.save(_good(), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                out.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(info, data)
    _refused_everywhere(tmp_path / "bomb.pt", tmp_path, "compressed")


def test_flipped_bit_in_the_pickle_is_corruption(tmp_path):
    raw = bytearray(GOOD.read_bytes())
    z = zipfile.ZipFile(GOOD)
    info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    lr = raw.index(b"lr", start)  # a byte of the pickle near a hyperparameter
    raw[lr + 12] ^= 0x01
    (tmp_path / "flip.pt").write_bytes(bytes(raw))
    r = invoke("inspect", str(tmp_path / "flip.pt"))
    assert r.exit_code == 2 and "corrupt" in r.stderr, r.stderr


def test_absurd_index_counts_are_refused_before_per_index_work(tmp_path):
    torch.save({"state": {}, "param_groups": [{"lr": 0.1, "params": list(range(1_200_000))}]}, tmp_path / "many.pt")
    r = invoke("inspect", str(tmp_path / "many.pt"))
    assert r.exit_code == 2 and "limit 1,000,000" in r.stderr, r.stderr


def test_oversized_safetensors_headers_are_refused(tmp_path):
    n = 240_000
    hdr = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    assert len(raw) > 16 << 20
    with open(tmp_path / "big.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * n))
    r = invoke("inspect", str(tmp_path / "big.safetensors"))
    assert r.exit_code == 2 and "limit 16 MiB" in r.stderr, r.stderr


@pytest.mark.slow
def test_many_single_parameter_groups_still_work(tmp_path):
    """Per-parameter groups (mmengine paramwise_cfg, layer-wise lr decay) at scale: 30k groups."""
    n = 30_000
    torch.save({"state": {i: {"momentum_buffer": torch.zeros(1)} for i in range(0, n, 3)},
                "param_groups": [{"lr": 0.1 * (1 + i % 7), "momentum": 0.9, "params": [i]} for i in range(n)]},
               tmp_path / "groups.pt")
    r = invoke("inspect", str(tmp_path / "groups.pt"), "--format", "json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert len(rep["optimizers"][0]["groups"]) == n
    r = invoke("diff", str(tmp_path / "groups.pt"), str(tmp_path / "groups.pt"))
    assert r.exit_code == 0, r.stderr
    r = invoke("set", str(tmp_path / "groups.pt"), "--group", "7", "--lr", "0.5", "-o", str(tmp_path / "o.pt"))
    assert r.exit_code == 0, r.stderr


def _with_counted(tmp_path, name: str, payload: bytes):
    """The bundle with one more entry whose value is ``payload`` (raw opcodes: an allowlisted
    constructor called with a count)."""
    clean = tmp_path / f"{name}_clean.pt"
    torch.save({**_good(), "x": SLOT}, clean)
    path = tmp_path / f"{name}.pt"
    _splice(clean, path, payload, legacy=False)
    return path


@pytest.mark.parametrize("name,payload,needle", [
    # bytearray(2**30): a gigabyte of zeros written during the load, from a 20-byte pickle
    ("bytearray", b"c__builtin__\nbytearray\nJ" + struct.pack("<i", 1 << 30) + b"\x85R", "a bytearray made from int"),
    # torch.Tensor(2**26): 256 MB of uninitialised memory (of 2e9: 8 GB) that remap would write and diff compare
    ("tensor", b"ctorch\nTensor\nJ" + struct.pack("<i", 1 << 26) + b"\x85R", "memory made from a count"),
    ("storage", b"ctorch.storage\nTypedStorage\nJ" + struct.pack("<i", 1 << 26) + b"\x85R",
     "memory made from a count"),
])
def test_memory_made_from_a_count_is_refused(tmp_path, name, payload, needle):
    """Allowlisted constructors given a count (torch's loader calls them as given): work no longer
    bounded by the file. Refused by every command in one line; numpy arrays and bytearrays pickled
    as data still read."""
    path = _with_counted(tmp_path, name, payload)
    assert path.stat().st_size < 50_000
    _refused_everywhere(path, tmp_path, needle)


def test_numpy_arrays_made_from_a_count_are_refused_and_real_ones_read(tmp_path):
    np = pytest.importorskip("numpy")
    path = _with_counted(tmp_path, "ndarray", b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                                              b"J" + struct.pack("<i", 1 << 26) + b"\x85C\x01b\x87R")
    r = invoke("inspect", str(path))
    assert r.exit_code == 2 and "numpy's _reconstruct" in r.stderr, r.stderr
    path = _with_counted(tmp_path, "ndarray2", b"cnumpy\nndarray\nJ" + struct.pack("<i", 1 << 26) + b"\x85\x85R")
    r = invoke("inspect", str(path))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    real = tmp_path / "real.pt"
    torch.save({**_good(), "arr": np.arange(1000.0), "ba": bytearray(b"abc" * 100)}, real)
    r = invoke("inspect", str(real))
    assert r.exit_code == 0, r.stderr


def test_a_bytearray_torch_would_make_from_a_count_is_refused_before_it_is_made(tmp_path):
    """A legacy (pre-1.6) file is read by torch's own loader, which calls ``bytearray(n)`` as asked;
    optckpt runs it with the bounded constructor (:func:`~optckpt.io.safepickle.torch_table_bounded`):
    refused in one line before the memory is filled (the test's 128 MiB would otherwise be spent)."""
    clean = tmp_path / "clean.pt"
    torch.save({**_good(), "x": SLOT}, clean, _use_new_zipfile_serialization=False)
    path = tmp_path / "legacy.pt"
    _splice(clean, path, b"c__builtin__\nbytearray\nJ" + struct.pack("<i", 1 << 27) + b"\x85R", legacy=True)
    r = invoke("inspect", str(path))
    assert r.exit_code == 2 and "a bytearray made from int" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("payload,needle", [
    # a count-made CPU tensor converted to float64 during the load (16 GB written by torch's own function)
    (b"ctorch._utils\n_rebuild_device_tensor_from_cpu_tensor\n(ctorch\nTensor\nJ" + struct.pack("<i", 1 << 26)
     + b"\x85Rctorch\nfloat64\nX\x03\x00\x00\x00cpu\x89tR", "another dtype"),
    # the same without the conversion: nothing copied, the budget refuses it after the load
    (b"ctorch._utils\n_rebuild_device_tensor_from_cpu_tensor\n(ctorch\nTensor\nJ" + struct.pack("<i", 1 << 26)
     + b"\x85Rctorch\nfloat32\nX\x03\x00\x00\x00cpu\x89tR", "memory made from a count"),
])
def test_device_tensors_made_from_a_count_are_refused(tmp_path, payload, needle):
    path = _with_counted(tmp_path, "device", payload)
    r = invoke("inspect", str(path))
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_device_tensor_saved_through_numpy_reads_on_the_cpu(tmp_path):
    """What torch writes for a tensor of a storage-less device (XLA): its CPU copy as a numpy array
    (bfloat16 as float32) and the dtype to rebuild; read onto the CPU as the bfloat16 tensor."""
    np = pytest.importorskip("numpy")
    arr = np.arange(6, dtype=np.float32)
    head = b"ctorch._utils\n_rebuild_device_tensor_from_numpy\n("
    clean = tmp_path / "clean.pt"
    torch.save({**_good(), "arr": arr, "x": SLOT}, clean)
    data = torch.load(clean, weights_only=False)
    assert np.array_equal(data["arr"], arr)
    import pickletools

    from optckpt.io import torchfile
    ops = list(pickletools.genops(torchfile._check_zip(str(clean)).pickle))
    i = next(k for k, (op, arg, _) in enumerate(ops) if op.name == "GLOBAL" and arg.endswith(" _reconstruct"))
    t3 = next(k for k in range(i, len(ops)) if ops[k][0].name == "TUPLE3")  # (ndarray, (0,), b"b")
    j = next(k for k in range(t3, len(ops)) if ops[k][0].name == "REDUCE")  # the array, then its memo slot
    slot = ops[j + 1]
    assert slot[0].name in ("BINPUT", "LONG_BINPUT")
    get = b"h" + bytes([slot[1]]) if slot[1] < 256 else b"j" + struct.pack("<I", slot[1])
    path = tmp_path / "xla.pt"
    _splice(clean, path, head + get + b"ctorch\nbfloat16\nX\x05\x00\x00\x00xla:0\x89tR", legacy=False)
    got = torchfile.load_torch_file(str(path), lazy=True).obj["x"]
    assert got.dtype == torch.bfloat16 and got.device.type == "cpu" and got.tolist() == list(range(6))


def _encoded(text: str, encoding: str, errors: str | None = None) -> bytes:
    """``_codecs.encode(text, encoding[, errors])`` as raw opcodes (pickle writes bytes this way before
    protocol 3, with ``latin1``)."""
    def s(v: str) -> bytes:
        b = v.encode()
        return b"X" + struct.pack("<I", len(b)) + b
    return b"c_codecs\nencode\n(" + s(text) + s(encoding) + (s(errors) if errors else b"") + b"tR"


# ~1 ms a character in punycode's encoder: 3,000 of them cost seconds, a 1 MB pickle hours
_SLOW = "".join(chr(0x100 + (i * 7919) % 5000) for i in range(3000))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("payload", [
    _encoded(_SLOW, "punycode"),
    _encoded("abc", "latin1", "backslashreplace"),  # an error handler: whatever a library registered under the name
    b"c__builtin__\nbytearray\n(X" + struct.pack("<I", len(_SLOW.encode())) + _SLOW.encode()
    + b"X\x08\x00\x00\x00punycodetR",
])
def test_codecs_other_than_what_pickle_writes_are_refused_before_they_run(tmp_path, payload, legacy):
    """``_codecs.encode`` and ``bytearray(str, encoding)`` are in torch's allowlist for the bytes pickle
    writes as latin-1 text; any codec name was looked up (an ``encodings`` module imported by the
    file's say) and run: punycode's encoder takes ~1 ms a character (torch's loader alike). Refused in
    one line by optckpt's readers and, where optckpt calls torch's loader (legacy files), by it too."""
    clean = tmp_path / "clean.pt"
    torch.save({**_good(), "x": SLOT}, clean, _use_new_zipfile_serialization=not legacy)
    path = tmp_path / "codec.pt"
    _splice(clean, path, payload, legacy=legacy)
    r = invoke("inspect", str(path))
    assert r.exit_code == 2 and "refused" in r.stderr and "_codecs.encode with" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bytes_pickled_as_latin1_text_still_read(tmp_path):
    """What pickle writes for bytes and bytearrays before protocol 3 (torch.save's protocol 2) reads as
    before, in every reader: the lazy one, the torch-backed ones, torch's own (legacy files)."""
    import pickle as pkl

    import torch._weights_only_unpickler as wou

    from optckpt.io import load
    table = wou._get_allowed_globals
    payload = bytes(range(256)) * 4
    for legacy in (False, True):
        p = tmp_path / f"bytes_{legacy}.pt"
        torch.save({**_good(), "raw": payload, "arr": bytearray(payload)}, p, _use_new_zipfile_serialization=not legacy)
        data = p.read_bytes()
        assert b"_codecs\nencode" in data or b"_codecs\x94" in data or legacy, "protocol 2 writes bytes as latin-1 text"
        for lazy in (False, True):
            obj = load(p, lazy=lazy).parts[0].obj
            assert obj["raw"] == payload and obj["arr"] == bytearray(payload)
    assert pkl.loads(pkl.dumps(payload, protocol=2)) == payload
    assert wou._get_allowed_globals is table  # (torch's table swapped for its loads only)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("made", [b"c__builtin__\nset\n", b"ccollections\nCounter\n", b"ctorch\nSize\n"],
                         ids=["set", "Counter", "Size"])
def test_containers_made_by_iterating_a_count_are_refused_before_they_iterate(tmp_path, made, legacy):
    """``set(torch.Tensor(n))``: both allowlisted, and the set iterates n elements (10**6 took 6.4 s and
    0.9 GB from a 1 KB pickle, accepted; 10**9 runs the machine out of memory). pickle makes a set from
    a list, a Counter from a dict, a Size from a tuple: anything else is refused as it is called, by
    optckpt's readers and by torch's own where optckpt calls it (legacy files)."""
    clean = tmp_path / "clean.pt"
    torch.save({**_good(), "x": SLOT}, clean, _use_new_zipfile_serialization=not legacy)
    path = tmp_path / "iterated.pt"
    _splice(clean, path, made + b"ctorch\nTensor\nJ" + struct.pack("<i", 10 ** 6) + b"\x85R\x85R", legacy=legacy)
    r = invoke("inspect", str(path))
    assert r.exit_code == 2 and "made from Tensor" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_containers_pickled_as_pickle_writes_them_still_read(tmp_path):
    from collections import Counter, OrderedDict

    from optckpt.io import load
    values = {"s": {1, 2, "a"}, "c": Counter({"x": 3, "y": 1}), "o": OrderedDict([("b", 1), ("a", 2)]),
              "size": torch.Size([3, 4]), "empty_set": set(), "empty_counter": Counter()}
    for legacy in (False, True):
        p = tmp_path / f"containers_{legacy}.pt"
        torch.save({**_good(), **values}, p, _use_new_zipfile_serialization=not legacy)
        for lazy in (False, True):
            obj = load(p, lazy=lazy).parts[0].obj
            for k, v in values.items():
                assert obj[k] == v and type(obj[k]).__name__ == type(v).__name__, (k, legacy, lazy)
