"""Mapping inference + ``optckpt check``: verdicts on real optimizers, real models, real files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, invoke, run_cli
from models_zoo import BlockReordered, TinyGPT, TwoSame, decay_groups, gpt_loss
from torch import nn

import optckpt
from optckpt.check import check_mapping
from optckpt.mapping import infer_mapping, param_shape
from optckpt.target import from_live


def _save(tmp_path, model: nn.Module, opt: torch.optim.Optimizer, name: str = "ck.pt", **extra) -> str:
    path = str(tmp_path / name)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **extra}, path)
    return path


def _report(path: str, target: nn.Module, target_opt: torch.optim.Optimizer | None = None, **kw):
    ck = optckpt.load(path)
    return check_mapping(infer_mapping(ck, **kw), from_live(target, target_opt))


def _statuses(rep) -> dict[str, str]:
    return {p.name: p.status for p in rep.params}


# --- the seed case, through the CLI -------------------------------------------------------------

def test_seed_case_all_four_moved():
    r = run_cli("check", "seed/optimizer_0.pth", "--model", "seed/model_0.pth",
                "--target", "models.py:build_model2", "--format", "json", cwd=FIXTURES)
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert rep["safe"] is False
    assert rep["counts"]["moved"] == 4 and sum(rep["counts"].values()) == 4
    assert all(p["status"] == "moved" for p in rep["params"])


def test_seed_case_against_itself_is_safe():
    r = run_cli("check", "seed/optimizer_0.pth", "--model", "seed/model_0.pth",
                "--target", "models.py:build_model", "--format", "json", cwd=FIXTURES)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["safe"] is True and rep["counts"]["ok"] == 4


def test_seed_case_table_leads_with_crashes():
    r = invoke("check", str(FIXTURES / "seed" / "optimizer_0.pth"), "--model", str(FIXTURES / "seed" / "model_0.pth"),
               "--target", str(FIXTURES / "models.py") + ":build_model2")
    assert r.exit_code == 1
    assert "NOT SAFE" in r.stdout and "CRASH" in r.stdout


def test_prediction_matches_what_torch_does():
    """The crash check['crash'] predicts is the crash torch really raises."""
    import sys

    sys.path.insert(0, str(FIXTURES))
    from models import Model2

    sd = torch.load(FIXTURES / "seed" / "optimizer_0.pth", weights_only=True)
    m2 = Model2()
    opt = torch.optim.Adam(m2.parameters())
    opt.load_state_dict(sd)
    m2(torch.randn(4, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="must match the size"):
        opt.step()


# --- silent swaps ---------------------------------------------------------------------------------

def _train(model, opt, steps=2, inp=(3, 4)):
    for s in range(steps):
        opt.zero_grad()
        model(torch.randn(*inp, generator=torch.Generator().manual_seed(s))).square().mean().backward()
        opt.step()


def test_same_shaped_swap_is_silent(tmp_path):
    m = TwoSame()
    opt = torch.optim.Adam(m.parameters())
    _train(m, opt)
    rep = _report(_save(tmp_path, m, opt), TwoSame(swap=True)).as_json()
    assert not rep["safe"]
    for p in rep["params"]:
        assert p["status"] == "moved" and p["silent"] is True and p["crash"] is False


# --- transformer-like: identical blocks, decay / no-decay groups, reordered submodules --------------

def test_transformer_blocks_reordered_every_name_exact(tmp_path):
    m = TinyGPT(n_layer=6)
    opt = torch.optim.AdamW(decay_groups(m), lr=1e-3)
    for s in range(2):
        opt.zero_grad()
        gpt_loss(m, s).backward()
        opt.step()
    path = _save(tmp_path, m, opt)
    ck = optckpt.load(path)
    mapping = infer_mapping(ck)
    assert mapping.evidence == "model-order"
    assert not mapping.ambiguous
    truth = {}
    names = {id(p): n for n, p in m.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            truth[len(truth)] = names[id(p)]
    assert mapping.name_of() == truth
    target = TinyGPT(n_layer=6, block=BlockReordered)
    rep = check_mapping(mapping, from_live(target, torch.optim.AdamW(decay_groups(target)))).as_json()
    assert rep["counts"]["ambiguous"] == 0 and rep["counts"]["missing"] == 0 and rep["counts"]["unexpected"] == 0
    assert rep["counts"]["moved"] > 0 and not rep["safe"]


# --- frozen params, params without state, buffers, tied weights ----------------------------------

class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(self.fc(x))


def test_frozen_backbone_absent_from_optimizer(tmp_path):
    m = CNN()
    for p in [*m.conv.parameters(), *m.bn.parameters()]:
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad])
    _train(m, opt, inp=(2, 3, 5, 5))
    mapping = infer_mapping(optckpt.load(_save(tmp_path, m, opt)))
    assert mapping.name_of() == {0: "fc.weight", 1: "fc.bias", 2: "head.weight", 3: "head.bias"}
    m2 = CNN()
    for p in [*m2.conv.parameters(), *m2.bn.parameters()]:
        p.requires_grad_(False)
    rep = check_mapping(mapping, from_live(m2, torch.optim.Adam([p for p in m2.parameters() if p.requires_grad])))
    assert rep.safe


def test_batchnorm_buffers_do_not_confuse(tmp_path):
    m = CNN()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    _train(m, opt, inp=(2, 3, 5, 5))
    mapping = infer_mapping(optckpt.load(_save(tmp_path, m, opt)))
    assert not mapping.ambiguous
    assert [e.name for e in mapping.entries] == [n for n, _ in m.named_parameters()]


def test_sgd_without_momentum_has_no_state_yet_maps_by_order(tmp_path):
    m = CNN()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    _train(m, opt, inp=(2, 3, 5, 5))
    ck = optckpt.load(_save(tmp_path, m, opt))
    assert all(not v for v in ck.optimizer().state.values())
    mapping = infer_mapping(ck)
    # every model parameter is in the group: order alone pins each index
    assert [e.name for e in mapping.entries] == [n for n, _ in m.named_parameters()]
    assert rep_safe(mapping, CNN())


def rep_safe(mapping, target):
    return check_mapping(mapping, from_live(target)).safe


def test_param_without_grad_has_no_state_and_is_pinned_by_neighbours(tmp_path):
    m = CNN()
    opt = torch.optim.Adam(m.parameters())
    opt.zero_grad()
    m.head(torch.randn(2, 4)).sum().backward()  # only the head gets gradients
    opt.step()
    ck = optckpt.load(_save(tmp_path, m, opt))
    mapping = infer_mapping(ck)
    assert mapping.name_of() == dict(enumerate(n for n, _ in m.named_parameters()))


def test_partial_group_without_state_is_ambiguous_not_guessed(tmp_path):
    """One of several params optimized, no state yet: which one is not knowable."""
    m = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3), "c": nn.Linear(3, 3)})
    opt = torch.optim.SGD([m["b"].weight], lr=0.1)
    mapping = infer_mapping(optckpt.load(_save(tmp_path, m, opt)))
    assert mapping.entries[0].name is None
    assert set(mapping.entries[0].candidates) == {n for n, _ in m.named_parameters()}  # no state: no shape
    target = from_live(m, torch.optim.SGD([m["b"].weight], lr=0.1))
    rep = check_mapping(mapping, target, group_evidence=False)
    # still uncertain, but an index without state cannot receive the wrong state: nothing to refuse
    assert rep.counts["ambiguous"] == 1 and rep.params[0].risk == "none" and rep.safe
    # the new optimizer's grouping (one group of one parameter) names it
    rep = check_mapping(mapping, target)
    assert rep.counts == {**rep.counts, "ok": 1, "ambiguous": 0}
    assert rep.params[0].evidence == "group-structure" and rep.safe


def test_tied_embeddings(tmp_path):
    m = TinyGPT(n_layer=2)
    opt = torch.optim.Adam(m.parameters())
    opt.zero_grad()
    gpt_loss(m).backward()
    opt.step()
    ck = optckpt.load(_save(tmp_path, m, opt))
    assert ck.models[0].tied == {"lm_head.weight": "wte.weight"}
    mapping = infer_mapping(ck)
    assert [e.name for e in mapping.entries] == [n for n, _ in m.named_parameters()]
    assert check_mapping(mapping, from_live(TinyGPT(n_layer=2))).safe
    moved = check_mapping(mapping, from_live(TinyGPT(n_layer=2, head_first=True)))
    assert {p.name for p in moved.params if p.status == "moved"} >= {"ln_f.weight", "ln_f.bias"}


def test_adafactor_factored_state(tmp_path):
    m = CNN()
    opt = torch.optim.Adafactor(m.parameters(), lr=1e-2)
    _train(m, opt, inp=(2, 3, 5, 5))
    ck = optckpt.load(_save(tmp_path, m, opt))
    assert "row_var" in ck.optimizer().state[0]
    assert param_shape(ck.optimizer().state[0]) == (4, 3, 3, 3)
    mapping = infer_mapping(ck)
    assert [e.name for e in mapping.entries] == [n for n, _ in m.named_parameters()]
    m2 = CNN()
    rep = check_mapping(mapping, from_live(nn.ModuleDict({"head": m2.head, "fc": m2.fc, "conv": m2.conv, "bn": m2.bn})))
    assert rep.counts["moved"] == 8


def test_lbfgs_global_state(tmp_path):
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
    opt = torch.optim.LBFGS(m.parameters(), max_iter=3)
    x = torch.randn(5, 3)

    def closure():
        opt.zero_grad()
        loss = m(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    ck = optckpt.load(_save(tmp_path, m, opt))
    st = ck.optimizer().state
    assert list(st) == [0] and "d" in st[0]  # one global state, under the first index
    mapping = infer_mapping(ck)
    assert [e.name for e in mapping.entries] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert all(e.shape is None for e in mapping.entries)
    assert check_mapping(mapping, from_live(m)).safe
    swapped = nn.Sequential()
    swapped.add_module("1", nn.Linear(4, 4))
    swapped.add_module("0", nn.Linear(3, 4))
    rep = check_mapping(mapping, from_live(swapped))
    # the flat direction vectors are laid out in parameter order: plain loading silently scrambles them
    assert rep.counts["moved"] == 4 and all(p.silent for p in rep.params)


def test_param_names_are_exact(tmp_path):
    ck = optckpt.load(FIXTURES / "named_optimizer.pt")
    mapping = infer_mapping(ck)
    assert mapping.evidence == "param_names"
    assert mapping.name_of()[6] == "classifier.weight"


def test_shape_mismatch_missing_unexpected(tmp_path):
    m = nn.ModuleDict({"enc": nn.Linear(4, 4), "head": nn.Linear(4, 3), "old": nn.Linear(4, 2)})
    opt = torch.optim.Adam(m.parameters())
    opt.zero_grad()
    sum(layer(torch.ones(1, 4)).sum() for layer in m.values()).backward()
    opt.step()
    new = nn.ModuleDict({"enc": nn.Linear(4, 4), "head": nn.Linear(4, 5), "extra": nn.Linear(4, 4)})
    rep = _report(_save(tmp_path, m, opt), new)
    st = _statuses(rep)
    assert st["enc.weight"] == "ok" and st["enc.bias"] == "ok"
    assert st["head.weight"] == "shape_mismatch" and st["head.bias"] == "shape_mismatch"
    assert st["extra.weight"] == "missing" and st["old.weight"] == "unexpected"


def test_group_structure_change_is_reported(tmp_path):
    m = TwoSame()
    opt = torch.optim.SGD([{"params": m.a.parameters()}, {"params": m.b.parameters(), "lr": 0.01}], lr=0.1,
                          momentum=0.9)
    _train(m, opt)
    path = _save(tmp_path, m, opt)
    new = TwoSame()  # the new code puts every parameter in one group
    rep = _report(path, new, torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)).as_json()
    assert rep["groups"]["load_would_fail"] and not rep["safe"]
    assert rep["groups"]["source"] == [2, 2] and rep["groups"]["target"] == [4]
    # a model without its optimizer says nothing about grouping: the saved grouping is assumed, and said
    # (a and b have the same shapes: which saved group is which stays uncertain, nothing is proven wrong)
    rep = _report(path, TwoSame()).as_json()
    assert rep["verdict"] == "cannot_prove_safe" and rep["groups"]["target"] == [2, 2]
    assert all(p["risk"] != "misapplied" for p in rep["params"])
    assert any("the target has no optimizer: assuming the saved grouping" in n for n in rep["notes"])


def test_lightning_prefix_is_detected():
    r = invoke("check", str(FIXTURES / "lightning" / "last.ckpt"), "--target",
               str(FIXTURES / "real_models.py") + ":build_tinynet", "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0, r.stdout
    assert rep["safe"] and any("--rename net.=" in n for n in rep["notes"])


def test_safetensors_order_is_never_used(tmp_path):
    """accelerate: weights sorted by name; no name may be guessed from that order."""
    r = invoke("check", str(FIXTURES / "accelerate" / "state"), "--target",
               str(FIXTURES / "real_models.py") + ":build_tinynet", "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and not rep["safe"]
    assert rep["evidence"] == "shapes-only"
    assert rep["counts"]["ambiguous"] > 0
    # only shape-unique parameters are named, and they are named right
    named = {p["name"]: p for p in rep["params"] if p["status"] != "ambiguous"}
    assert set(named) <= {"embed.weight", "head.weight", "head.bias"}
    assert all(p["status"] == "ok" for p in named.values())


def test_source_gives_exact_names_for_accelerate():
    r = invoke("check", str(FIXTURES / "accelerate" / "state"), "--target",
               str(FIXTURES / "real_models.py") + ":build_tinynet_reordered",
               "--source", str(FIXTURES / "real_models.py") + ":build_tinynet", "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1
    assert rep["evidence"] == "source" and rep["counts"]["ambiguous"] == 0 and rep["counts"]["moved"] == 9


def test_names_file_target(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]))
    r = invoke("check", str(FIXTURES / "seed" / "optimizer_0.pth"), "--model", str(FIXTURES / "seed" / "model_0.pth"),
               "--target", str(names))
    assert r.exit_code == 0, r.stdout + r.stderr


def test_a_names_file_claims_neither_a_crash_nor_a_silent_misapplication(tmp_path):
    """A names file gives no shapes: every moved row is misapplied, none claims that the shapes coincide
    (SILENT) or differ (CRASH); the same reordering from code, whose shapes are known, crashes. Before,
    the names file's rows said SILENT ("shapes coincide") where each one in truth crashes."""
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["linear2.weight", "linear2.bias", "linear1.weight", "linear1.bias"]))
    common = (str(FIXTURES / "seed" / "optimizer_0.pth"), "--model", str(FIXTURES / "seed" / "model_0.pth"))
    from_names = json.loads(invoke("check", *common, "--target", str(names), "--format", "json").stdout)
    from_code = json.loads(invoke("check", *common, "--target", str(FIXTURES / "models.py") + ":build_model2",
                                  "--format", "json").stdout)
    assert from_names["verdict"] == from_code["verdict"] == "would_misapply"
    moved = [p for p in from_names["params"] if p["status"] == "moved"]
    assert len(moved) == 4
    assert all(not p["silent"] and not p["crash"] and p["risk"] == "misapplied" for p in moved), moved
    assert all(p["crash"] and not p["silent"] for p in from_code["params"] if p["status"] == "moved")
    table = invoke("check", *common, "--target", str(names)).stdout
    assert "SILENT" not in table and "CRASH" not in table and table.count("shapes unknown") == 4, table


def test_bad_target_is_exit_2(tmp_path):
    for spec in ["nonexistent_module_xyz:build", str(FIXTURES / "models.py") + ":nope", "garbage"]:
        r = invoke("check", str(FIXTURES / "bundle.pt"), "--target", spec)
        assert r.exit_code == 2 and r.stderr.startswith("optckpt: error:"), spec
        assert len(r.stderr.strip().splitlines()) == 1
