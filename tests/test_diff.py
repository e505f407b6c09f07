"""``optckpt diff``: exactly what changed, by name, across layouts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, invoke, run_cli
from models_zoo import BlockReordered, TinyGPT, gpt_loss

import optckpt
from optckpt.diff import compare_tensors


def _diff(a, b, *args):
    r = invoke("diff", str(a), str(b), *args, "--format", "json")
    assert r.exit_code in (0, 1), r.stderr
    return r.exit_code, json.loads(r.stdout)


def test_identical_and_resaved_copy(tmp_path):
    code, rep = _diff(FIXTURES / "bundle.pt", FIXTURES / "bundle.pt")
    assert code == 0 and rep["identical"] and rep["entries"] == []
    resaved = tmp_path / "resaved.pt"
    torch.save(torch.load(FIXTURES / "bundle.pt", weights_only=True), resaved)
    code, rep = _diff(FIXTURES / "bundle.pt", resaved)
    assert code == 0, rep
    code, _ = _diff(FIXTURES / "bundle.pt", FIXTURES / "cuda_saved.pt")  # same content, other device tag
    assert code == 0


def _perturbed_pair(tmp_path, eps=1e-3):
    ck = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    b = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    b["model"]["conv2.weight"] = b["model"]["conv2.weight"] + eps  # one perturbed tensor
    b["model"]["bn.running_stat"] = b["model"].pop("bn.running_var")  # one renamed tensor (a buffer)
    b["optimizer"]["param_groups"][0]["lr"] = 0.5  # one changed group lr
    b["epoch"] = 4  # a changed epoch
    torch.save(ck, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    return tmp_path / "a.pt", tmp_path / "b.pt"


def test_exactly_the_four_changes(tmp_path):
    a, b = _perturbed_pair(tmp_path)
    code, rep = _diff(a, b)
    assert code == 1
    got = {(e["section"], e["name"], e["key"], e["status"]) for e in rep["entries"]}
    assert got == {
        ("model", "conv2.weight", None, "changed"),
        ("model", "bn.running_stat", None, "renamed"),
        ("param_groups", "group 0", "lr", "changed"),
        ("extra", "extras", "epoch", "changed"),
    }
    e = next(e for e in rep["entries"] if e["name"] == "conv2.weight")
    assert e["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3) and e["rel_l2"] > 0
    assert next(e for e in rep["entries"] if e["status"] == "renamed")["renamed_from"] == "bn.running_var"
    # --atol above the perturbation hides it, and only it
    code, rep = _diff(a, b, "--atol", "2e-3")
    assert {e["name"] for e in rep["entries"]} == {"bn.running_stat", "group 0", "extras"}


def test_reordered_model_compares_by_name(tmp_path):
    """The same training state saved from the original and from a reordered model: identical."""
    torch.manual_seed(0)
    m = TinyGPT(n_layer=2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for s in range(2):
        opt.zero_grad()
        gpt_loss(m, s).backward()
        opt.step()
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    m2 = TinyGPT(n_layer=2, block=BlockReordered)
    m2.load_state_dict(m.state_dict())
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    assert optckpt.load_optimizer_state_dict(opt2, m2, str(tmp_path / "a.pt")).clean
    for p in opt2.param_groups:
        p.pop("param_names", None)
    torch.save({"model": m2.state_dict(), "optimizer": opt2.state_dict()}, tmp_path / "b.pt")
    assert list(torch.load(tmp_path / "b.pt")["model"]) != list(m.state_dict())  # really reordered
    code, rep = _diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert code == 0, rep["entries"][:5]
    assert rep["compared"]["optimizer"] == len(list(m.parameters()))


def test_optimizer_state_change_by_name(tmp_path):
    a = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    a["optimizer"]["state"][6]["exp_avg"] = a["optimizer"]["state"][6]["exp_avg"] * 2
    torch.save(a, tmp_path / "b.pt")
    code, rep = _diff(FIXTURES / "bundle.pt", tmp_path / "b.pt", "--stats")
    assert code == 1
    (e,) = rep["entries"]
    assert (e["section"], e["name"], e["key"]) == ("optimizer", "classifier.weight", "exp_avg")
    assert e["stats"]["cosine"] == pytest.approx(1.0)
    code, rep = _diff(FIXTURES / "bundle.pt", tmp_path / "b.pt", "--only", "model")
    assert code == 0


def test_different_layouts(tmp_path):
    """A bundled .pt against a safetensors file of the same weights: the model section compares."""
    from safetensors.torch import save_file

    sd = torch.load(FIXTURES / "bundle.pt", weights_only=True)["model"]
    save_file(sd, tmp_path / "m.safetensors")
    code, rep = _diff(FIXTURES / "bundle.pt", tmp_path / "m.safetensors", "--only", "model")
    assert code == 0, rep


def test_markdown_and_limit(tmp_path):
    a, b = _perturbed_pair(tmp_path)
    r = invoke("diff", str(a), str(b), "--format", "markdown", "--limit", "2")
    assert r.exit_code == 1 and "|" in r.stdout and "more (--limit)" in r.stdout


def test_diff_errors_are_exit_2(tmp_path):
    r = run_cli("diff", str(FIXTURES / "bundle.pt"), str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and r.stderr.startswith("optckpt: error:")


def test_compare_tensors_nan_and_tolerance():
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert compare_tensors(a, a.clone()).bit_identical
    d = compare_tensors(a, torch.tensor([1.0, float("nan"), 3.5]), atol=0.1)
    assert not d.equal_within_tol and d.max_abs_diff == 0.5 and d.changed_elements == 1
    assert compare_tensors(a, torch.tensor([1.0, float("nan"), 3.05]), atol=0.1).equal_within_tol
    big = torch.randn(3_000_000)
    d = compare_tensors(big, big + 1e-3)
    assert d.max_abs_diff == pytest.approx(1e-3, rel=1e-2) and d.changed_elements == big.numel()


def test_seed_systems_diff_by_name(tmp_path):
    """diff works on the seed systems' layouts too (3DGS tuple with named groups)."""
    ck = torch.load(FIXTURES / "gaussians" / "chkpnt3.pth", weights_only=True)
    args, it = ck
    opt = args[10]
    opt["param_groups"][1]["lr"] = 0.01
    torch.save((args, it), tmp_path / "b.pth")
    code, rep = _diff(FIXTURES / "gaussians" / "chkpnt3.pth", tmp_path / "b.pth")
    assert code == 1
    assert [(e["name"], e["key"]) for e in rep["entries"]] == [("group 1", "lr")]


def test_nested_scheduler_state_is_one_row_per_changed_path(tmp_path):
    """A SequentialLR keeps its children's state in ``_schedulers``: a changed child field is its own
    entry (``_schedulers.1.last_epoch``), not one cell holding the whole list."""
    def save(steps, path):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=0.1)
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt, [torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=2),
                  torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)], milestones=[2])
        for _ in range(steps):
            opt.step()
            sched.step()
        torch.save({"model": {"p": p.detach()}, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()},
                   path)

    save(3, tmp_path / "a.pt")
    save(4, tmp_path / "b.pt")
    r = invoke("diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--only", "scheduler", "--format", "json")
    keys = {e["key"] for e in json.loads(r.stdout)["entries"]}
    assert r.exit_code == 1 and "_schedulers.1.last_epoch" in keys and "_schedulers" not in keys, keys
