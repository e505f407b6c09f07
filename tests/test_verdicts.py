"""Verdicts users can trust on real groupings: stateless indices, empty groups, policy groups and
one group per parameter, the new code's grouping as evidence, and one ambiguity contract for the CLI
and the API. Ground truth is continuity: one more step after the repair equals the uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
import verdict_models as V
from conftest import ROOT, invoke, invoke_json, run_cli
from torch import nn

import optckpt
from optckpt.check import check_mapping
from optckpt.mapping import infer_mapping
from optckpt.target import from_live

VM = str(ROOT / "tests" / "verdict_models.py")

CASES = [(o, g) for o in V.OPTIMIZERS for g in V.GROUPINGS if o != "LBFGS" or g == "single"]


def _train_and_save(tmp_path, model_cls, grouping, optimizer, steps=3, scale_lr=0.5):
    """Train, change every group's lr as a schedule would (so a fresh target's lr is wrong), save."""
    model, opt = V.build(model_cls, grouping, optimizer)
    for s in range(steps):
        V.step(model, opt, s)
    for g in opt.param_groups:
        g["lr"] *= scale_lr
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": steps}, path)
    V.step(model, opt, steps)  # the uninterrupted run's next step
    return path, {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    got = {n: p.detach() for n, p in model.named_parameters()}
    assert got.keys() == reference.keys()
    for n in got:
        torch.testing.assert_close(got[n], reference[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


# --- (1) state-aware verdicts: unchanged code is always safe ----------------------------------------

@pytest.mark.parametrize("optimizer,grouping", CASES)
def test_unchanged_model_is_safe_for_every_optimizer_and_grouping(tmp_path, optimizer, grouping):
    path, _ = _train_and_save(tmp_path, V.Net, grouping, optimizer)
    model, opt = V.build(V.Net, grouping, optimizer)
    report = check_mapping(infer_mapping(optckpt.load(path)), from_live(model, opt))
    assert report.verdict == "safe", report.as_json()
    assert report.safe


@pytest.mark.parametrize("spec", ["sgd_single_old", "sgd_decay_old", "adam_per_param_old",
                                  "sgd_momentum_policy_old"])
def test_check_cli_exits_0_on_unchanged_code(tmp_path, spec):
    grouping, optimizer = {"sgd_single_old": ("single", "SGD"), "sgd_decay_old": ("decay", "SGD"),
                           "adam_per_param_old": ("per_param", "Adam"),
                           "sgd_momentum_policy_old": ("policy", "SGD-momentum")}[spec]
    path, _ = _train_and_save(tmp_path, V.Net, grouping, optimizer)
    code, rep = invoke_json("check", str(path), "--target", f"{VM}:{spec}")
    assert code == 0 and rep["verdict"] == "safe", rep
    # the evidence is visible per index
    assert all(p["evidence"] for p in rep["params"] if p["source_index"] is not None)


@pytest.mark.parametrize("spec", ["sgd_single_new", "sgd_decay_new"])
def test_stateless_pure_reorder_is_safe(tmp_path, spec):
    """SGD without momentum keeps no state: a reorder cannot misapply anything (same groups)."""
    grouping = "single" if "single" in spec else "decay"
    path, _ = _train_and_save(tmp_path, V.Net, grouping, "SGD")
    r = invoke("check", str(path), "--target", f"{VM}:{spec}")
    assert r.exit_code == 0, r.stdout
    assert "SAFE" in r.stdout and "SILENT" not in r.stdout and "CRASH" not in r.stdout


def test_stateless_index_in_a_group_with_other_hparams_is_flagged(tmp_path):
    """Per-layer lrs, no state: a reorder puts parameters in groups with another lr."""
    path, _ = _train_and_save(tmp_path, V.Net, "per_param", "SGD")
    model, opt = V.build(V.NetReordered, "per_param", "SGD")
    report = check_mapping(infer_mapping(optckpt.load(path)), from_live(model, opt))
    assert report.verdict == "would_misapply"
    assert all(not p.crash and not p.silent for p in report.params)
    assert any(p.risk == "misapplied" and not p.has_state for p in report.params)


def test_uncertain_is_not_misapplied(tmp_path):
    """Names uncertain, nothing proven wrong: the headline says "cannot prove safe", not "misapply"."""
    path, _ = _train_and_save(tmp_path, V.Net, "policy", "SGD-momentum")
    code, rep = invoke_json("check", str(path), "--target", f"{VM}:sgd_momentum_policy_old",
                            "--no-group-evidence")
    assert code == 1 and rep["verdict"] == "cannot_prove_safe" and rep["counts"]["ambiguous"] > 0
    r = invoke("check", str(path), "--target", f"{VM}:sgd_momentum_policy_old", "--no-group-evidence")
    assert "CANNOT PROVE SAFE" in r.stdout and "misapply" not in r.stdout.splitlines()[0]


# --- (2)/(3) continuity without --source: remap CLI and the API ---------------------------------------

CONTINUITY = [("policy", "SGD-momentum", "sgd_momentum_policy_new"),
              ("per_param", "Adam", "adam_per_param_new"),
              ("decay", "SGD", "sgd_decay_new"),
              ("single", "SGD", "sgd_single_new")]


@pytest.mark.parametrize("grouping,optimizer,spec", CONTINUITY)
def test_continuity_remap_cli_without_source(tmp_path, grouping, optimizer, spec):
    path, reference = _train_and_save(tmp_path, V.Net, grouping, optimizer)
    out = tmp_path / "fixed.pt"
    r = invoke("remap", str(path), "--target", f"{VM}:{spec}", "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    model, opt = V.build(V.NetReordered, grouping, optimizer)
    ck = torch.load(out, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    V.step(model, opt, 3)
    _assert_same(model, reference)
    # and the repaired file is now exactly right for the new code
    code, rep = invoke_json("check", str(out), "--target", f"{VM}:{spec}")
    assert code == 0, rep


@pytest.mark.parametrize("grouping,optimizer,spec", CONTINUITY)
def test_continuity_api_without_source(tmp_path, grouping, optimizer, spec):
    path, reference = _train_and_save(tmp_path, V.Net, grouping, optimizer)
    model, opt = V.build(V.NetReordered, grouping, optimizer)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    report = optckpt.load_optimizer_state_dict(opt, model, str(path))
    assert not report.ambiguous and not report.missing and not report.unexpected
    V.step(model, opt, 3)
    _assert_same(model, reference)


def test_group_evidence_is_its_own_rung_and_can_be_turned_off(tmp_path):
    path, _ = _train_and_save(tmp_path, V.Net, "policy", "SGD-momentum")
    code, rep = invoke_json("check", str(path), "--target", f"{VM}:sgd_momentum_policy_new")
    by = {p["name"]: p["evidence"] for p in rep["params"]}
    assert "group-structure" in by.values() and "model-order" in by.values()
    assert rep["evidence_counts"]["group-structure"] > 0 and rep["counts"]["ambiguous"] == 0
    assert any("assuming the new code groups parameters as the old code did" in n for n in rep["notes"])
    r = invoke("remap", str(path), "--target", f"{VM}:sgd_momentum_policy_new", "--dry-run")
    assert "named by:" in r.stdout and "group-structure" in r.stdout
    r = invoke("remap", str(path), "--target", f"{VM}:sgd_momentum_policy_new", "--dry-run", "--no-group-evidence")
    assert r.exit_code == 2 and "uncertain names" in r.stderr


def test_one_group_per_parameter_names_by_group_order(tmp_path):
    """Per-layer lr groups of one parameter each, Adam, several same-shaped layers: shapes and order
    cannot tell which group is which; the new code's groups follow its model's order, so the old
    ones are taken to follow the old model's (with the new model reordered)."""
    path, _ = _train_and_save(tmp_path, V.Net, "per_param", "Adam")
    mapping = infer_mapping(optckpt.load(path))
    assert mapping.ambiguous
    code, rep = invoke_json("check", str(path), "--target", f"{VM}:adam_per_param_new")
    assert rep["counts"]["ambiguous"] == 0 and rep["evidence_counts"]["group-order"] > 0, rep
    assert code == 1 and rep["verdict"] == "would_misapply"  # reordered: plain loading is wrong
    code, rep = invoke_json("inspect", str(path))
    assert {e["evidence"] for e in rep["optimizers"][0]["entries"]} == {"model-order"}
    # groups not in the new model's order: no assumption made
    path2 = tmp_path / "shuffled.pt"
    model, opt = V.build(V.Net, "per_param", "Adam")
    V.step(model, opt, 0)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path2)
    new = V.Net()
    groups = V.per_param(new)
    shuffled = torch.optim.Adam(groups[::-1], lr=1e-2)
    report = check_mapping(infer_mapping(optckpt.load(path2)), from_live(new, shuffled))
    assert "group-order" not in {p.evidence for p in report.params}


# --- (4) one ambiguity contract ------------------------------------------------------------------

def _genuinely_ambiguous(tmp_path):
    """Two of three same-shaped layers optimized (Adam state); the new optimizer holds all three."""
    torch.manual_seed(0)
    m = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3), "c": nn.Linear(3, 3)})
    opt = torch.optim.Adam([m["a"].weight, m["c"].weight], lr=0.1)
    m["a"].weight.grad = torch.ones(3, 3)
    m["c"].weight.grad = torch.ones(3, 3)
    opt.step()
    path = tmp_path / "amb.pt"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, path)
    return path, m


def test_api_raises_on_ambiguous_by_default_and_resets_when_allowed(tmp_path):
    path, m = _genuinely_ambiguous(tmp_path)
    opt = torch.optim.Adam([m["a"].weight, m["b"].weight, m["c"].weight], lr=0.1)
    with pytest.raises(optckpt.MappingError, match=r"index 0: a\.weight \| b\.weight"):
        optckpt.load_optimizer_state_dict(opt, m, str(path))
    assert not opt.state  # nothing loaded
    r = invoke("remap", str(path), "--target", str(_names_file(tmp_path)), "--dry-run")
    assert r.exit_code == 2 and "index 0: a.weight | b.weight" in r.stderr
    report = optckpt.load_optimizer_state_dict(opt, m, str(path), allow_ambiguous=True)
    assert sorted(report.ambiguous) == ["<index 0>", "<index 1>"]
    assert not opt.state
    # strict is about missing / unexpected / shape_mismatch only; uncertainty is allow_ambiguous's
    report = optckpt.load_optimizer_state_dict(opt, m, str(path), allow_ambiguous=True, strict=True)
    assert len(report.ambiguous) == 2


def _names_file(tmp_path):
    p = tmp_path / "names.json"
    p.write_text(json.dumps(["a.weight", "b.weight", "c.weight"]))
    return p


def test_stateless_uncertain_indices_never_block(tmp_path):
    """SGD without momentum on a model with a float buffer: no name is certain, nothing to refuse."""
    path, _ = _train_and_save(tmp_path, V.Net, "single", "SGD")
    model, opt = V.build(V.NetReordered, "single", "SGD")
    mapping = infer_mapping(optckpt.load(path))
    assert mapping.ambiguous and not any(e.has_state for e in mapping.entries)
    report = optckpt.load_optimizer_state_dict(opt, model, str(path), group_evidence=False)
    assert not report.ambiguous
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)  # the saved (scheduled) lr, not the fresh 0.05


# --- (5) empty groups -------------------------------------------------------------------------------

def _trainer_like(model: nn.Module) -> torch.optim.Optimizer:
    """The transformers Trainer's grouping under LoRA: every trainable weight decays, the no-decay
    group is empty ([8, 0])."""
    return torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.01},
                              {"params": [], "weight_decay": 0.0}], lr=1e-3)


def test_empty_group_matched_and_keeps_saved_hparams(tmp_path):
    torch.manual_seed(0)
    model = V.Net()
    opt = _trainer_like(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    for s in range(3):
        V.step(model, opt, s)
        sched.step()
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    saved = [dict(g) for g in opt.state_dict()["param_groups"]]
    new = V.Net()
    new_opt = _trainer_like(new)
    report = check_mapping(infer_mapping(optckpt.load(path)), from_live(new, new_opt))
    assert report.source_groups == [len(saved[0]["params"]), 0] == report.target_groups
    assert report.safe, report.as_json()
    out = tmp_path / "out.pt"
    r = invoke("remap", str(path), "--target", f"{VM}:sgd_single_old", "--dry-run")  # other grouping: no crash
    assert r.exit_code == 0
    from optckpt.remap import Policy, apply_plan, build_plan

    ck = optckpt.load(path)
    plan, _ = build_plan(infer_mapping(ck), saved, from_live(new, new_opt), Policy())
    groups = apply_plan(plan, ck.optimizer().state_dict)["param_groups"]
    for got, want in zip(groups, saved):
        assert {k: v for k, v in got.items() if k not in ("params", "param_names")} == \
            {k: v for k, v in want.items() if k != "params"}
    assert groups[1]["lr"] == saved[1]["lr"] != 1e-3 and "initial_lr" in groups[1]
    del out


# --- (5) LBFGS -----------------------------------------------------------------------------------

def _lbfgs_trained(tmp_path):
    torch.manual_seed(0)
    model = V.Small()
    opt = V.named_lbfgs(model)
    for s in range(2):
        V.step(model, opt, s)
    path = tmp_path / "lbfgs.pt"
    torch.save({"optimizer": opt.state_dict()}, path)
    return model, opt, path


def _same_lbfgs_state(a: dict, b: dict) -> None:
    ga, gb = a["state"][0], b["state"][0]
    assert ga.keys() == gb.keys()
    for k in ga:
        va, vb = ga[k], gb[k]
        if isinstance(va, list):
            assert len(va) == len(vb) and all(x is y is None or torch.equal(x, y) for x, y in zip(va, vb))
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
        else:
            assert va == vb, k


def test_lbfgs_rename_with_param_names_keeps_history(tmp_path):
    _, opt, path = _lbfgs_trained(tmp_path)
    out = tmp_path / "out.pt"
    r = run_cli("remap", str(path), "--target", f"{VM}:lbfgs_renamed_head", "--rename", "head.=classifier.",
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "history is reset" not in r.stdout
    _same_lbfgs_state(opt.state_dict(), torch.load(out, weights_only=True)["optimizer"])


def test_enable_load_by_name_keeps_lbfgs_state(tmp_path):
    model, opt, _ = _lbfgs_trained(tmp_path)
    sd = opt.state_dict()
    fresh = V.named_lbfgs(model)
    optckpt.enable_load_by_name(fresh, model)
    fresh.load_state_dict(sd)
    _same_lbfgs_state(sd, fresh.state_dict())


# --- (6) rename hints ------------------------------------------------------------------------------

def test_rename_hint_for_prefix_change(tmp_path):
    torch.manual_seed(0)
    old = nn.ModuleDict({"enc": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)), "head": nn.Linear(3, 2),
                         "aux": nn.Linear(2, 2)})
    opt = torch.optim.Adam(old.parameters(), lr=0.1)
    old["enc"][0].weight.grad = torch.ones(4, 4)
    opt.step()
    path = tmp_path / "ck.pt"
    torch.save({"model": old.state_dict(), "optimizer": opt.state_dict()}, path)
    new = nn.ModuleDict({"encoder": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)), "head": nn.Linear(3, 2),
                         "aux": nn.Linear(2, 2)})
    report = check_mapping(infer_mapping(optckpt.load(path)), from_live(new, torch.optim.Adam(new.parameters())))
    assert report.hints == [("enc.", "encoder.")]
    assert report.as_json()["rename_hints"] == [{"old": "enc.", "new": "encoder."}]
    assert report.counts["missing"] == report.counts["unexpected"] == 4
