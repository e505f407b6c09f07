"""``diff``'s bulk comparison of record tensors (runs of records compared as one range of bytes,
then record by record) proves only what the per-tensor comparison would find: the same report,
entry for entry and in the same order, with and without it; and it spares the per-tensor work
exactly where bytes are equal."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from optckpt import io

diff = importlib.import_module("optckpt.diff")  # (the module: optckpt.diff is also the verb)


def _bundle() -> dict:
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    sd = {"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}
    sd["optimizer"]["state"][0]["exp_avg"] = torch.zeros(4, 4)
    return sd


def _variants(base: dict) -> dict[str, dict]:
    out = {"same": copy.deepcopy(base)}
    b = copy.deepcopy(base)
    b["model"]["3.weight"] = b["model"]["3.weight"] + 1e-3
    b["optimizer"]["state"][7]["step"] = torch.tensor(2.0)
    b["optimizer"]["state"][9]["exp_avg"] = b["optimizer"]["state"][9]["exp_avg"] * 0.0  # -0.0 where negative
    b["optimizer"]["state"][20]["exp_avg_sq"][0] = float("nan")
    out["changed"] = b
    c = copy.deepcopy(base)
    c["model"]["0.weight"] = c["model"]["0.weight"].t().contiguous().t()  # same values, another stride
    c["model"]["1.weight"] = c["model"]["1.weight"].to(torch.float64)  # another dtype
    c["extra"] = torch.zeros(1000)  # every record after it at another distance
    out["shifted"] = c
    d = copy.deepcopy(base)
    d["optimizer"]["state"][0]["exp_avg"] = -torch.zeros(4, 4)  # other bytes (-0.0), equal values
    out["signed_zero"] = d
    return out


@pytest.mark.parametrize("which", ["same", "changed", "shifted", "signed_zero"])
def test_bulk_comparison_changes_nothing_but_the_work(tmp_path, monkeypatch, which):
    base = _bundle()
    torch.save(base, tmp_path / "a.pt")
    torch.save(_variants(base)[which], tmp_path / "b.pt")
    a, b = io.load(str(tmp_path / "a.pt"), lazy=True), io.load(str(tmp_path / "b.pt"), lazy=True)
    calls: list[str] = []
    real = diff._tensor_entry

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(diff, "_tensor_entry", counted)
    bulk = diff.diff_checkpoints(a, b).as_json()
    compared_with_bulk = len(calls)
    monkeypatch.setattr(diff, "_identical", lambda pairs: [False] * len(pairs))  # every pair one by one
    calls.clear()
    single = diff.diff_checkpoints(a, b).as_json()
    assert bulk == single
    assert len(calls) == 12 * 2 + 12 * 2 * 3  # every model tensor and state value, without the bulk
    entries = {"same": 0, "changed": 4, "shifted": 1, "signed_zero": 0}[which]  # (equal values: no entry)
    assert len(bulk["entries"]) == entries
    # compared one by one: only what differs in bytes (the record of another stride holds other bytes;
    # the one of another dtype is reported before any comparison)
    assert compared_with_bulk == {"same": 0, "changed": 4, "shifted": 2, "signed_zero": 1}[which]


@pytest.mark.parametrize("which", ["same", "changed", "shifted"])
@pytest.mark.parametrize("name", ["b.pt", "checkpoint-b-of-a-longer-name.pt"])
def test_files_saved_under_other_names_are_compared_by_their_records_alone(tmp_path, monkeypatch, which, name):
    """torch names a file's records after the file (``a/data/0``, ``b/data/0``): two files saved under
    other names differ in every zip header between their records, and records of another name length
    lie at a growing distance. Their records are still compared in batches of joined bytes (no
    per-record comparison), and prove exactly what the per-tensor comparison finds."""
    from optckpt import verify

    base = _bundle()
    torch.save(base, tmp_path / "a.pt")
    torch.save(_variants(base)[which], tmp_path / name)
    a, b = io.load(str(tmp_path / "a.pt"), lazy=True), io.load(str(tmp_path / name), lazy=True)
    calls: list[str] = []
    real = diff._tensor_entry
    monkeypatch.setattr(diff, "_tensor_entry", lambda *args, **kw: calls.append(args[1]) or real(*args, **kw))
    singles: list[int] = []
    same_buffers = verify._same_buffers
    monkeypatch.setattr(verify, "_same_buffers", lambda x, y: singles.append(len(x)) or same_buffers(x, y))
    bulk = diff.diff_checkpoints(a, b).as_json()
    assert len(calls) == {"same": 0, "changed": 4, "shifted": 2}[which]
    # whole ranges tried where records lie at one distance (their headers differ: no proof), never each of
    # the 96 records one by one
    assert len(singles) < 96 // 3
    monkeypatch.setattr(diff, "_identical", lambda pairs: [False] * len(pairs))
    assert diff.diff_checkpoints(a, b).as_json() == bulk
