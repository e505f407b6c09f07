"""The batched kernels equal the per-tensor reference loops (random tables, dtypes, odd sizes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optckpt.kernels import SMALL_SEGMENT, SegmentTable, fill_tensors, gather_segments, permute_segments, place_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]


def _reference(src, table, out):
    for s, d, n in zip(table.src.tolist(), table.dst.tolist(), table.length.tolist()):
        out[d:d + n] = src[s:s + n]
    return out


def _random_buffer(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(n, generator=g).to(dtype)
    return torch.randint(0, 100, (n,), generator=g).to(dtype)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(0, 40), min_size=0, max_size=60), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 1000), big=st.booleans())
def test_gather_equals_reference(lengths, dtype, seed, big):
    if big:
        lengths = [n * SMALL_SEGMENT // 8 for n in lengths]  # exercises the bulk-copy path
    total = sum(lengths)
    src = _random_buffer(total + 7, dtype, seed)
    rng = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=rng).tolist()
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    dst, pos = [], 3
    for k in perm:  # destinations: the segments in a random order, after an offset
        dst.append(pos)
        pos += lengths[k]
    table = SegmentTable.of([starts[k] for k in perm], dst, [lengths[k] for k in perm])
    out = torch.zeros(pos + 5, dtype=dtype)
    expected = _reference(src, table, torch.zeros(pos + 5, dtype=dtype))
    got = gather_segments(src, table, out)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_permute_segments():
    flat = torch.arange(10.0)
    assert permute_segments(flat, [2, 3, 5], [2, 0, 1]).tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert permute_segments(flat, [2, 3, 5], [1]).tolist() == [2, 3, 4]
    with pytest.raises(ValueError):
        permute_segments(flat, [2, 3], [0, 1])


def test_bad_tables():
    with pytest.raises(ValueError):
        gather_segments(torch.zeros(4), SegmentTable.of([3], [0], [2]), torch.zeros(4))
    with pytest.raises(ValueError):
        SegmentTable.of([0], [0, 1], [1])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=0, max_size=20),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.float16, torch.int64]), min_size=20, max_size=20),
       targets=st.lists(st.sampled_from([None, torch.float32, torch.bfloat16, torch.float64]), min_size=20,
                        max_size=20))
def test_place_tensors_equals_per_tensor_to(shapes, dtypes, targets):
    ts = [_random_buffer(int(torch.tensor(s).prod()) if s else 1, dtypes[i], i).reshape(s)
          for i, s in enumerate(shapes)]
    want = [targets[i] if dtypes[i].is_floating_point else None for i in range(len(ts))]
    devs = [torch.device("cpu")] * len(ts)
    got = place_tensors(ts, devs, want)
    for t, g, w in zip(ts, got, want):
        ref = t.to(dtype=w or t.dtype)
        assert g.shape == ref.shape and g.dtype == ref.dtype and torch.equal(g, ref)
        if w is None or w == t.dtype:
            assert g is t  # already in place: no copy, like Tensor.to


def test_fill_tensors():
    ts = [torch.ones(3), torch.ones(2, dtype=torch.float16), torch.ones(4, dtype=torch.int64)]
    fill_tensors(ts, 0)
    assert all(int(t.abs().sum()) == 0 for t in ts)
    fill_tensors(ts, 0.25)
    assert float(ts[0][0]) == 0.25


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_place_tensors_to_cuda_one_transfer():
    ts = [torch.randn(i + 1) for i in range(200)]
    got = place_tensors(ts, [torch.device("cuda")] * 200, [torch.float32] * 200)
    assert all(g.device.type == "cuda" and torch.equal(g.cpu(), t) for g, t in zip(got, ts))
    assert len({g.untyped_storage().data_ptr() for g in got}) == 1  # one buffer, one transfer


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gather_on_cuda():
    src = torch.arange(100.0, device="cuda")
    table = SegmentTable.of([90, 0], [0, 10], [10, 5])
    out = gather_segments(src, table, torch.zeros(15, device="cuda"))
    assert out.cpu().tolist() == list(range(90, 100)) + list(range(0, 5))


def test_api_moves_state_in_batches_to_the_parameters_device(tmp_path):
    """Parameters on another device (meta here; cuda on a GPU machine): the state lands there, in
    the parameters' dtype, with shapes intact, as torch's own load would put it."""
    import optckpt

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(m.parameters())
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    dev = torch.device("cuda" if torch.cuda.is_available() else "meta")
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(device=dev, dtype=torch.bfloat16)
    opt2 = torch.optim.Adam(m2.parameters())
    assert optckpt.load_optimizer_state_dict(opt2, m2, str(tmp_path / "a.pt")).clean
    for p in m2.parameters():
        st = opt2.state[p]
        assert st["exp_avg"].device.type == dev.type and st["exp_avg"].dtype == torch.bfloat16
        assert st["exp_avg"].shape == p.shape
        assert st["step"].device.type == "cpu"  # torch keeps step on the CPU (not capturable)
