"""Editing DCP checkpoints where they are: ``set``, ``reset`` and ``remap --in-place``.

Every edit is read back with torch's own ``dcp.load`` into a fresh model / optimizer /
scheduler (``get_state_dict`` + ``set_state_dict``, the torchtitan resume path) and resumed."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, invoke, run_cli, run_two_ranks
from models_zoo import TinyGPT, gpt_loss
from test_dcp import MULTI_RANK, Wrapped
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import optckpt

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.2, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[3]),
}


def _fresh(sched_name: str = "StepLR", model_cls=None):
    torch.manual_seed(0)
    m = (model_cls or (lambda: TinyGPT(n_layer=2)))()
    opt = torch.optim.AdamW([{"params": [p for n, p in m.named_parameters() if n.startswith("h.")]},
                             {"params": [p for n, p in m.named_parameters() if not n.startswith("h.")], "lr": 3e-3}],
                            lr=1e-2)
    return m, opt, SCHEDULERS[sched_name](opt)


def _step(m, opt, sched, seed):
    opt.zero_grad()
    gpt_loss(m, seed).backward()
    opt.step()
    sched.step()


def _save(m, opt, sched, path, extra=2):
    msd, osd = get_state_dict(m, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optimizer": osd, "lr_scheduler": sched.state_dict(), "extra": {"step": extra}},
                 checkpoint_id=str(path), no_dist=True)


def _resume(path, sched_name="StepLR", model_cls=None, partial=False):
    """torch's own DCP resume path into fresh objects."""
    m, opt, sched = _fresh(sched_name, model_cls)
    msd, osd = get_state_dict(m, opt)
    state = {"model": msd, "optimizer": osd, "lr_scheduler": sched.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path), no_dist=True,
                 planner=DefaultLoadPlanner(allow_partial_load=True) if partial else None)
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    sched.load_state_dict(state["lr_scheduler"])
    return m, opt, sched


def _snapshot(path):
    return {n: (path / n).read_bytes() for n in sorted(os.listdir(path))}


@pytest.fixture
def trained(tmp_path):
    def make(sched_name="StepLR", steps=3):
        m, opt, sched = _fresh(sched_name)
        for s in range(steps):
            _step(m, opt, sched, s)
        path = tmp_path / f"ckpt-{sched_name}"
        _save(m, opt, sched, path)
        return path, m, opt, sched
    return make


def _lrs(opt, sched, m, n=6, start=10):
    out = []
    for s in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        _step(m, opt, sched, start + s)
    return out


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("in_place", [False, True])
def test_set_scale_lr_halves_the_resumed_schedule(trained, tmp_path, sched_name, in_place):
    path, m, opt, sched = trained(sched_name)
    shards = {n: (path / n).read_bytes() for n in os.listdir(path) if n.endswith(".distcp")}
    before = _snapshot(path)
    weights = [p.detach().clone() for p in m.parameters()]
    reference = _lrs(opt, sched, m)
    out = path if in_place else tmp_path / "halved"
    args = ["--in-place"] if in_place else ["-o", str(out)]
    r = invoke("set", str(path), "--scale-lr", "0.5", *args, "--format", "json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["written"] == str(out) and rep["groups"] == [0, 1]
    for n, data in shards.items():  # every shard carried over byte for byte, never rewritten
        assert (out / n).read_bytes() == data
    if in_place:
        assert (path / ".metadata.bak").read_bytes() == before[".metadata"]
        assert len([n for n in os.listdir(path) if n.startswith("__optckpt_")]) == 1
    else:
        assert _snapshot(path) == before
        assert os.path.samefile(out / sorted(shards)[0], path / sorted(shards)[0])  # a hard link, not a copy
    m2, opt2, sched2 = _resume(out, sched_name)
    for p, q in zip(weights, m2.parameters()):
        assert torch.equal(p, q)
    resumed = _lrs(opt2, sched2, m2)
    assert resumed == [[x * 0.5 for x in row] for row in reference]


def test_set_keeps_state_and_weights_and_diff_shows_only_the_groups(trained, tmp_path):
    path, m, opt, sched = trained("OneCycleLR")
    out = tmp_path / "wd"
    r = invoke("set", str(path), "--group", "1", "--weight-decay", "0.05", "--set", "eps=1e-6", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    m2, opt2, _ = _resume(out, "OneCycleLR")
    assert opt2.param_groups[1]["weight_decay"] == 0.05 and opt2.param_groups[1]["eps"] == 1e-6
    assert opt2.param_groups[0]["weight_decay"] == opt.param_groups[0]["weight_decay"]
    for (n, p), q in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
        for k, v in opt.state[p].items():
            assert torch.equal(opt2.state[q][k], v)
    r = invoke("diff", str(path), str(out), "--format", "json")
    entries = json.loads(r.stdout)["entries"]
    assert r.exit_code == 1 and {e["section"] for e in entries} == {"param_groups"}
    assert {e["key"] for e in entries} == {"weight_decay", "eps"}


def _reference_reset(m, opt, sched, names, seed=20):
    """The ground truth: the uninterrupted run with those parameters' state deleted (fresh)."""
    params = dict(m.named_parameters())
    for n in names:
        opt.state.pop(params[n], None)
    _step(m, opt, sched, seed)
    return {n: p.detach().clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("mode", [["--mode", "zero"], []], ids=["zero", "default"])
@pytest.mark.parametrize("in_place", [False, True])
def test_reset_zero_fresh_for_the_glob_exact_for_the_rest(trained, tmp_path, in_place, mode):
    """Both --mode zero and the default mode on DCP resume the standard way (strict dcp.load)."""
    path, m, opt, sched = trained()
    before = _snapshot(path)
    out = path if in_place else tmp_path / "reset"
    args = ["--in-place"] if in_place else ["-o", str(out)]
    r = invoke("reset", str(path), "--params", "h.0.*", *mode, *args, "--format", "json")
    assert r.exit_code == 0, r.stderr
    selected = [s["name"] for s in json.loads(r.stdout)["selected"]]
    assert selected == [n for n, _ in m.named_parameters() if n.startswith("h.0.")]
    for n, data in before.items():
        if n.endswith(".distcp"):
            assert (out / n).read_bytes() == data
    if not in_place:
        assert _snapshot(path) == before
    m2, opt2, sched2 = _resume(out)  # a strict dcp.load: every key is there
    p1, p2 = dict(m.named_parameters()), dict(m2.named_parameters())
    for n in p1:
        st = opt2.state[p2[n]]
        if n in selected:
            assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
        else:
            for k, v in opt.state[p1[n]].items():
                assert torch.equal(st[k], v), (n, k)
    reference = _reference_reset(m, opt, sched, selected)
    _step(m2, opt2, sched2, 20)
    for n, p in m2.named_parameters():
        torch.testing.assert_close(p.detach(), reference[n], atol=1e-6, rtol=0)


def test_reset_drop_is_a_metadata_edit(trained, tmp_path):
    path, m, opt, sched = trained()
    out = tmp_path / "dropped"
    r = invoke("reset", str(path), "--params", "ln_f.*", "--params", "wpe.*", "--mode", "drop", "-o", str(out),
               "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(path))  # no extra shard: nothing was written but metadata
    ck = optckpt.load(out)
    names = set(ck.optimizer().state)
    dropped = {n for n, _ in m.named_parameters() if n.startswith(("ln_f.", "wpe."))}
    assert dropped and not names & dropped and names == {n for n, _ in m.named_parameters()} - dropped
    m2, opt2, _ = _resume(out, partial=True)
    p1, p2 = dict(m.named_parameters()), dict(m2.named_parameters())
    for n in p1:
        if n not in dropped:
            for k, v in opt.state[p1[n]].items():
                assert torch.equal(opt2.state[p2[n]][k], v)
        else:  # kept what torch's own initialisation gave (zero moments)
            assert not opt2.state[p2[n]]["exp_avg"].any()


def test_remap_in_place_keeps_the_old_metadata_recoverable(trained, tmp_path):
    path, m, opt, sched = trained()
    target = tmp_path / "wrapped.py"
    target.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                      "from test_dcp import Wrapped\n\ndef build():\n    return Wrapped()\n")
    before = _snapshot(path)
    r = run_cli("remap", str(path), "--target", f"{target}:build", "--in-place", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["written"] == str(path)
    assert (path / ".metadata.bak").read_bytes() == before[".metadata"]
    for n, data in before.items():
        if n != ".metadata":
            assert (path / n).read_bytes() == data
    new = Wrapped()
    new_opt = torch.optim.AdamW([{"params": [p for n, p in new.named_parameters() if n.startswith("net.h.")]},
                                 {"params": [p for n, p in new.named_parameters() if not n.startswith("net.h.")]}],
                                lr=1e-2)
    msd, osd = get_state_dict(new, new_opt)
    state = {"model": msd, "optimizer": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    set_state_dict(new, new_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    old = dict(m.named_parameters())
    for n, p in new.named_parameters():
        assert torch.equal(p.detach(), old[n.removeprefix("net.")].detach())
        assert torch.equal(new_opt.state[p]["exp_avg"], opt.state[old[n.removeprefix("net.")]]["exp_avg"])
    # a second in-place edit needs --replace-backup; the old metadata restores the original exactly
    r = invoke("set", str(path), "--scale-lr", "0.5", "--in-place")
    assert r.exit_code == 2 and "previous backup" in r.stderr and r.stderr.count("\n") == 1
    os.replace(path / ".metadata.bak", path / ".metadata")
    m2, opt2, sched2 = _resume(path)
    reference = {n: p.detach().clone() for n, p in m.named_parameters()}
    for n, p in m2.named_parameters():
        assert torch.equal(p.detach(), reference[n])
    _step(m, opt, sched, 30)
    _step(m2, opt2, sched2, 30)
    for p, q in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), atol=1e-6, rtol=0)


def test_repeated_in_place_edits_clean_up_unreferenced_extra_shards(trained):
    path, m, opt, sched = trained()
    reference = _lrs(opt, sched, m)
    for _ in range(3):
        r = invoke("set", str(path), "--scale-lr", "0.5", "--in-place", "--replace-backup")
        assert r.exit_code == 0, r.stderr
    extras = sorted(n for n in os.listdir(path) if n.startswith("__optckpt_"))
    assert len(extras) == 2  # the current one and the one .metadata.bak refers to
    m2, opt2, sched2 = _resume(path)
    assert _lrs(opt2, sched2, m2) == [[x * 0.125 for x in row] for row in reference]


def test_bad_outputs_are_one_line_errors(trained, tmp_path):
    path, *_ = trained()
    before = _snapshot(path)
    for args in (["set", str(path), "--scale-lr", "0.5"],
                 ["set", str(path), "--scale-lr", "0.5", "-o", str(path)],
                 ["reset", str(path), "--params", "h.*", "-o", str(tmp_path)],
                 ["reset", str(path), "--params", "nothing.*", "-o", str(tmp_path / "x")],
                 ["reset", str(path), "--params", "h.0.*", "--keys", "nope", "-o", str(tmp_path / "x")],
                 ["set", str(path), "--scale-lr", "0.5", "--in-place", "-o", str(tmp_path / "x")]):
        r = invoke(*args)
        assert r.exit_code == 2 and r.stderr.startswith("optckpt: error: ") and r.stderr.count("\n") == 1, args
    assert _snapshot(path) == before and not (tmp_path / "x").exists()


def test_dry_run_writes_nothing(trained, tmp_path):
    path, *_ = trained()
    before = _snapshot(path)
    assert invoke("set", str(path), "--scale-lr", "0.5", "--in-place", "--dry-run").exit_code == 0
    assert invoke("reset", str(path), "--params", "h.*", "--mode", "zero", "--in-place", "--dry-run").exit_code == 0
    assert _snapshot(path) == before


def test_two_process_sharded_dtensors_set_and_reset(tmp_path):
    """A real 2-process gloo save of row-sharded DTensors, edited in place, read back whole."""
    out = tmp_path / "multi"
    run_two_ranks(MULTI_RANK, out, tmp_path)
    full = torch.load(str(out) + ".full.pt", weights_only=True)
    shards = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".distcp")}
    assert len(shards) == 2
    r = invoke("set", str(out), "--lr", "0.002", "--in-place")
    assert r.exit_code == 0, r.stderr
    r = invoke("reset", str(out), "--params", "head.*", "--keys", "exp_avg", "--in-place", "--replace-backup")
    assert r.exit_code == 0, r.stderr
    for n, data in shards.items():
        assert (out / n).read_bytes() == data
    state = {"model": {k: torch.empty_like(v) for k, v in full.items()},
             "optimizer": {"state": {k: {"step": torch.tensor(0.0), "exp_avg": torch.empty_like(v),
                                         "exp_avg_sq": torch.empty_like(v)} for k, v in full.items()},
                           "param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "eps": 0.0, "weight_decay": 0.0,
                                             "amsgrad": True, "params": []}]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(out), no_dist=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.002
    for k, v in full.items():
        assert torch.equal(state["model"][k], v)
        st = state["optimizer"]["state"][k]
        assert torch.equal(st["exp_avg_sq"], v * v) and float(st["step"]) == 3.0
        assert torch.equal(st["exp_avg"], torch.zeros_like(v) if k.startswith("head.") else v * 0.1)
