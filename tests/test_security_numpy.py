"""numpy's objects, read as data, are memory-safe only as numpy's own pickles make them.

numpy's C code trusts a dtype's pickled state: a field past the item's end reads other memory, an
object field whose flags say "no objects" takes the file's bytes for object pointers (a crash at
the first repr or hash, with a crafted pointer worse), and ``scalar(dtype)`` without bytes makes
such pointers itself. Each case here crashed or read out of bounds before (run in a subprocess:
a crash must fail the test, not the test run); now each is refused in one line, and the numpy
values real checkpoints hold (arrays, scalars, RandomState states, object arrays) still read."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import FIXTURES, run_cli

np = pytest.importorskip("numpy")
multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray


class _Reduce:
    """An object pickled as the given reduce tuple: the opcodes numpy's pickles use, with a crafted state."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def _dtype(code: str, state: tuple) -> _Reduce:
    return _Reduce(np.dtype, (code, False, True), state)


_OBJECT_FIELD = _dtype("V8", (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 16))  # flags: no objects
_FIELD_PAST_END = _dtype("V8", (3, "|", None, ("a",), {"a": (np.dtype("<i8"), 4096)}, 8, 1, 16))
_OBJECTS_UNFLAGGED = _dtype("O8", (3, "|", None, None, None, -1, -1, 0))

CASES = {
    # the file's bytes as an object pointer: inspect's repr of the scalar crashed
    "object-field-scalar": _Reduce(multiarray.scalar, (_OBJECT_FIELD, b"\x41" * 8)),
    # a field 4 KB past an 8-byte item: the scalar's value was read from other memory
    "field-past-end-scalar": _Reduce(multiarray.scalar, (_FIELD_PAST_END, b"\x41" * 8)),
    # an object array made from bytes
    "objects-from-bytes-array": _Reduce(multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                                        (1, (2,), _OBJECTS_UNFLAGGED, False, b"\x41" * 16)),
    # scalar(dtype) with no bytes, of a dtype numpy builds (from its code, no state) with an object
    # field: numpy fills it with null pointers (inspect crashed)
    "scalar-without-bytes": _Reduce(multiarray.scalar, (_Reduce(np.dtype, ("i4,O", False, True)),)),
}


def _crafted(tmp_path, name: str):
    path = tmp_path / f"{name}.pt"
    torch.save({**torch.load(FIXTURES / "bundle.pt", weights_only=True), "x": CASES[name]}, path)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_numpy_objects_numpy_would_not_pickle_are_refused(tmp_path, name):
    path = _crafted(tmp_path, name)
    for args in (["inspect", str(path)], ["inspect", str(path), "--format", "json"],
                 ["diff", str(path), str(path)]):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.returncode, r.stdout[-300:], r.stderr[-500:])
        assert len(r.stderr.strip().splitlines()) == 1 and "numpy" in r.stderr, r.stderr


@pytest.mark.parametrize("lazy", [False, True])
def test_numpy_values_real_checkpoints_hold_still_read(tmp_path, lazy):
    from optckpt.io import load

    values = {"arr": np.arange(5.0), "scalar": np.float64(1.5), "int": np.int32(3), "big": np.arange(4, dtype=">i4"),
              "text": np.array(["ab", "c"]), "objects": np.array([1, "x", None], dtype=object),
              "rng": np.random.RandomState(0).get_state(), "empty": np.zeros((0, 3), dtype=np.float32),
              "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3))}
    path = tmp_path / "numpy.pt"
    torch.save({**torch.load(FIXTURES / "bundle.pt", weights_only=True), **values}, path)
    obj = load(path, lazy=lazy).parts[0].obj
    for k, v in values.items():
        got, v = obj[k], pickle.loads(pickle.dumps(v, protocol=2))  # (as numpy reads its pickle: '>i4' as int32)
        if k == "rng":
            assert got[0] == v[0] and np.array_equal(got[1], v[1]) and got[2:] == v[2:]
            continue
        assert type(got) is type(v) and got.dtype == v.dtype and np.array_equal(got, v), k
    assert np.dtype("float64").byteorder == "="  # (numpy's shared dtypes untouched)
    r = run_cli("inspect", str(path))
    assert r.returncode == 0, r.stderr
