"""remap / reset through the CLI: layouts kept, inputs never touched, dry runs, policies, errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from conftest import FIXTURES, invoke, invoke_json

SEED_OPT = str(FIXTURES / "seed" / "optimizer_0.pth")
SEED_MODEL = str(FIXTURES / "seed" / "model_0.pth")
MODEL2 = str(FIXTURES / "models.py") + ":build_model2"


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_lone_optimizer_stays_lone(tmp_path):
    out = tmp_path / "o.pth"
    before = _digest(SEED_OPT)
    r = invoke("remap", SEED_OPT, "--model", SEED_MODEL, "--target", MODEL2, "-o", str(out))
    assert r.exit_code == 0, r.stderr
    sd = torch.load(out, weights_only=True)
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["param_names"] == ["linear2.weight", "linear2.bias", "linear1.weight", "linear1.bias"]
    old = torch.load(SEED_OPT, weights_only=True)
    assert torch.equal(sd["state"][0]["exp_avg"], old["state"][2]["exp_avg"])
    assert _digest(SEED_OPT) == before


def test_bundle_keeps_other_keys_and_scheduler_follows(tmp_path):
    out = tmp_path / "b.pt"
    r = invoke("remap", str(FIXTURES / "bundle.pt"), "--target", str(FIXTURES / "models.py") + ":build_cnn_head_first",
               "-o", str(out))
    assert r.exit_code == 0, r.stderr
    before = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    after = torch.load(out, weights_only=True)
    assert list(after) == list(before)
    for k in ("epoch", "global_step", "best_acc1"):
        assert after[k] == before[k] if not isinstance(before[k], torch.Tensor) else torch.equal(after[k], before[k])
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])
    assert after["lr_scheduler"]["base_lrs"] == before["lr_scheduler"]["base_lrs"]
    r = invoke("check", str(out), "--target", str(FIXTURES / "models.py") + ":build_cnn_head_first")
    assert r.exit_code == 0, r.stdout


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "o.pth"
    r = invoke("remap", SEED_OPT, "--model", SEED_MODEL, "--target", MODEL2, "-o", str(out), "--dry-run",
               "--format", "json")
    assert r.exit_code == 0
    plan = json.loads(r.stdout)
    assert plan["written"] is None and plan["summary"]["move"] == 4
    assert not out.exists() and os.listdir(tmp_path) == []


def test_refuses_to_overwrite_input(tmp_path):
    p = tmp_path / "opt.pth"
    shutil.copy(SEED_OPT, p)
    r = invoke("remap", str(p), "--model", SEED_MODEL, "--target", MODEL2, "-o", str(p))
    assert r.exit_code == 2 and "--in-place" in r.stderr
    assert _digest(p) == _digest(SEED_OPT)


def test_in_place_appends_a_version_and_restore_brings_the_old_one_back(tmp_path):
    p = tmp_path / "opt.pth"
    shutil.copy(SEED_OPT, p)
    r = invoke("remap", str(p), "--model", SEED_MODEL, "--target", MODEL2, "--in-place")
    assert r.exit_code == 0, r.stderr
    assert _digest(p) != _digest(SEED_OPT)
    assert open(p, "rb").read().startswith(open(SEED_OPT, "rb").read())  # appended: no old byte rewritten
    assert sorted(os.listdir(tmp_path)) == ["opt.pth"]  # no temp files, no .bak: the old version is inside
    r = invoke("inspect", str(p), "--model", SEED_MODEL, "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["earlier_versions"] == 1, r.stderr
    assert "1 earlier version kept" in invoke("inspect", str(p), "--model", SEED_MODEL).stdout
    r = invoke("restore", str(p))
    assert r.exit_code == 0 and "0 earlier version(s) still kept" in r.stdout, r.stderr
    assert _digest(p) == _digest(SEED_OPT)
    r = invoke("restore", str(p))
    assert r.exit_code == 2 and "no earlier version" in r.stderr


def test_in_place_with_backup_keeps_a_full_copy(tmp_path):
    p = tmp_path / "opt.pth"
    shutil.copy(SEED_OPT, p)
    r = invoke("remap", str(p), "--model", SEED_MODEL, "--target", MODEL2, "--in-place", "--backup")
    assert r.exit_code == 0, r.stderr
    assert _digest(tmp_path / "opt.pth.bak") == _digest(SEED_OPT) and _digest(p) != _digest(SEED_OPT)
    assert os.stat(p).st_ino != os.stat(tmp_path / "opt.pth.bak").st_ino  # a copy: the file changes in place
    assert sorted(os.listdir(tmp_path)) == ["opt.pth", "opt.pth.bak"]
    # restore gives back those very bytes: the .bak is then stale and removed, so the next --backup works
    r = invoke("restore", str(p))
    assert r.exit_code == 0 and "removed" in r.stdout and not (tmp_path / "opt.pth.bak").exists(), r.output
    assert _digest(p) == _digest(SEED_OPT)
    r = invoke("remap", str(p), "--model", SEED_MODEL, "--target", MODEL2, "--in-place", "--backup")
    assert r.exit_code == 0, r.stderr
    # a .bak that differs from the restored file is named and kept
    (tmp_path / "opt.pth.bak").write_bytes(b"someone else's")
    r = invoke("restore", str(p))
    assert r.exit_code == 0 and "is kept" in r.stderr and (tmp_path / "opt.pth.bak").read_bytes() == b"someone else's"


def test_missing_output_dir_and_no_output(tmp_path):
    r = invoke("remap", SEED_OPT, "--model", SEED_MODEL, "--target", MODEL2, "-o", str(tmp_path / "no" / "o.pth"))
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = invoke("remap", SEED_OPT, "--model", SEED_MODEL, "--target", MODEL2)
    assert r.exit_code == 2 and "-o" in r.stderr


def test_policies_error(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["linear2.weight", "linear2.bias", "new.weight"]))
    base = ["remap", SEED_OPT, "--model", SEED_MODEL, "--target", str(names), "-o", str(tmp_path / "o.pth")]
    r = invoke(*base, "--missing", "error")
    assert r.exit_code == 2 and "new.weight" in r.stderr
    r = invoke(*base, "--unexpected", "error")
    assert r.exit_code == 2 and "linear1" in r.stderr
    r = invoke(*base, "--format", "json")
    assert r.exit_code == 0
    plan = json.loads(r.stdout)
    assert plan["summary"] == {"keep": 0, "move": 2, "reset": 1, "drop": 2}


def test_hf_directory_output_must_be_new(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    r = invoke("remap", str(FIXTURES / "hf_trainer" / "checkpoint-3"), "--target",
               str(FIXTURES / "hf_trainer" / "checkpoint-3"), "-o", str(out))
    assert r.exit_code == 2 and "already exists" in r.stderr


def test_hf_directory_in_place_swaps_and_keeps_bak(tmp_path):
    pytest.importorskip("transformers")
    d = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    r = invoke("remap", str(d), "--target", str(FIXTURES / "hf_trainer" / "checkpoint-3"), "--in-place")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "checkpoint-3.bak" / "optimizer.pt").read_bytes() == \
        (FIXTURES / "hf_trainer" / "checkpoint-3" / "optimizer.pt").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-3.bak"]
    sd = torch.load(d / "optimizer.pt", weights_only=True)
    assert "param_names" in sd["param_groups"][0]  # the next repair is exact


# --- reset -----------------------------------------------------------------------------------------

def test_reset_drops_selected_state(tmp_path):
    out = tmp_path / "b.pt"
    r = invoke("reset", str(FIXTURES / "bundle.pt"), "--params", "classifier.*", "-o", str(out), "--format", "json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [s["name"] for s in rep["selected"]] == ["classifier.weight", "classifier.bias"]
    before = torch.load(FIXTURES / "bundle.pt", weights_only=True)["optimizer"]
    after = torch.load(out, weights_only=True)["optimizer"]
    assert sorted(after["state"]) == [0, 1, 2, 3, 4, 5]
    for i in range(6):  # everything else untouched, bit for bit
        for k, v in before["state"][i].items():
            assert torch.equal(after["state"][i][k], v)
    assert after["param_groups"] == before["param_groups"]


def test_reset_zero_keys_uses_fresh_values(tmp_path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adagrad(m.parameters(), lr=0.1, initial_accumulator_value=0.25)
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    r = invoke("reset", str(tmp_path / "a.pt"), "--params", "bias", "--keys", "sum,step", "-o", str(tmp_path / "b.pt"))
    assert r.exit_code == 0, r.stderr
    st = torch.load(tmp_path / "b.pt", weights_only=True)["optimizer"]["state"]
    assert torch.equal(st[1]["sum"], torch.full((2,), 0.25)) and float(st[1]["step"]) == 0.0
    assert not torch.equal(st[0]["sum"], torch.full((2, 3), 0.25))


def test_reset_continuity_for_reinitialised_head(tmp_path):
    """Resetting the head's state == a run whose head is a fresh parameter to its optimizer."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(5, 3)
    for _ in range(2):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    r = invoke("reset", str(tmp_path / "a.pt"), "--params", "1.*", "-o", str(tmp_path / "b.pt"))
    assert r.exit_code == 0, r.stderr
    # reference: body keeps its moments, head's state is created fresh
    ref_opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    sd = opt.state_dict()
    sd["state"] = {k: v for k, v in sd["state"].items() if k in (0, 1)}
    ref_opt.load_state_dict(sd)
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m2.load_state_dict(m.state_dict())
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True)["optimizer"])
    for mod, o in ((m, ref_opt), (m2, opt2)):
        o.zero_grad()
        mod(x).square().mean().backward()
        o.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_reset_no_match_is_error(tmp_path):
    r = invoke("reset", str(FIXTURES / "bundle.pt"), "--params", "nothing.*", "-o", str(tmp_path / "x.pt"))
    assert r.exit_code == 2 and "no optimizer parameter matches" in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_lightning_ckpt_in_place_appends_and_restores(tmp_path):
    p = tmp_path / "last.ckpt"
    shutil.copy(FIXTURES / "lightning" / "last.ckpt", p)
    before = p.read_bytes()
    r = invoke("set", str(p), "--lr", "0.005", "--in-place")
    assert r.exit_code == 0, r.stderr
    ck = torch.load(p, weights_only=True)
    assert ck["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.005)
    assert p.read_bytes()[:len(before)] == before and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert invoke("restore", str(p)).exit_code == 0 and p.read_bytes() == before


# --- an optimizer saved with no model: check, remap and the resume API name it alike ---------------

def test_an_optimizer_saved_alone_is_remapped_as_check_names_it(tmp_path, monkeypatch):
    """One resolution for every consumer: with no model saved, a shape that occurs once in the
    optimizer and once in the target names its index (``target-shapes``) for ``check``, ``remap`` and
    ``load_optimizer_state_dict`` alike; on the seed model every shape is unique, so the plan is the
    very plan the saved model's order gives, and the state lands where it does with ``--model``."""
    code, report = invoke_json("check", SEED_OPT, "--target", MODEL2)
    assert code == 1 and report["evidence"] == "target-shapes" and report["counts"]["moved"] == 4
    moved = sorted(p["name"] for p in report["params"] if p["status"] == "moved")
    code, alone = invoke_json("remap", SEED_OPT, "--target", MODEL2, "--dry-run")
    assert code == 0 and alone["evidence"] == "target-shapes" and alone["evidence_counts"] == {"target-shapes": 4}
    assert sorted(s["name"] for s in alone["slots"] if s["action"] == "move") == moved
    assert any("named by shape only" in n for n in alone["notes"])
    code, with_model = invoke_json("remap", SEED_OPT, "--model", SEED_MODEL, "--target", MODEL2, "--dry-run")
    assert code == 0 and with_model["evidence"] == "model-order"
    assert alone["slots"] == with_model["slots"] and alone["groups"] == with_model["groups"]

    out_alone, out_model = tmp_path / "alone.pth", tmp_path / "model.pth"
    assert invoke("remap", SEED_OPT, "--target", MODEL2, "-o", str(out_alone)).exit_code == 0
    assert invoke("remap", SEED_OPT, "--model", SEED_MODEL, "--target", MODEL2, "-o", str(out_model)).exit_code == 0
    a, b = torch.load(out_alone, weights_only=True), torch.load(out_model, weights_only=True)
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])

    import optckpt

    monkeypatch.syspath_prepend(str(FIXTURES))
    import models  # type: ignore[import-not-found]

    model = models.build_model2()
    optimizer = torch.optim.Adam(model.parameters())
    loaded = optckpt.load_optimizer_state_dict(optimizer, model, SEED_OPT)
    assert loaded.evidence == "target-shapes" and sorted(loaded.moved) == moved
    names = dict(model.named_parameters())
    by_name = {n: i for i, n in enumerate(names)}
    for name, p in names.items():
        assert torch.equal(optimizer.state[p]["exp_avg"], b["state"][by_name[name]]["exp_avg"])
