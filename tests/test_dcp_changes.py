"""DCP (FQN-keyed) checkpoints against new code with renamed, added and removed parameters: every
command answers (no mixed int / name sorting anywhere), with the right statuses."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, invoke
from models_zoo import TinyGPT, gpt_loss
from torch.distributed.checkpoint.state_dict import get_state_dict

import optckpt

TARGETS = str(ROOT / "tests" / "dcp_targets.py")


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = TinyGPT(n_layer=2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for s in range(2):
        opt.zero_grad()
        gpt_loss(m, s).backward()
        opt.step()
    msd, osd = get_state_dict(m, opt)
    path = tmp_path_factory.mktemp("dcp") / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optimizer": osd, "extra": {"step": 2}}, checkpoint_id=str(path), no_dist=True)
    return path


@pytest.mark.parametrize("change,counts", [
    ("renamed", {"missing": 2, "unexpected": 2}), ("added", {"missing": 2}),
    ("removed", {"unexpected": 12}), ("same", {}),
])
def test_every_command_on_each_kind_of_change(ck, tmp_path, change, counts):
    target = f"{TARGETS}:{change}"
    r = invoke("check", str(ck), "--target", target, "--format", "json")
    assert r.exit_code == (0 if not counts else 1), r.stderr
    rep = json.loads(r.stdout)
    assert {k: v for k, v in rep["counts"].items() if v and k != "ok"} == counts
    r = invoke("check", str(ck), "--target", target)
    assert r.exit_code == (0 if not counts else 1) and r.stdout, r.stderr
    out = tmp_path / "out"
    r = invoke("remap", str(ck), "--target", target, "-o", str(out), "--format", "json")
    assert r.exit_code == 0, r.stderr
    new = optckpt.load(out)
    names = set(new.optimizer().state)
    target_names = {n for n, _ in __import__("dcp_targets").__dict__[change]().named_parameters()}
    assert names <= target_names  # nothing the new code lacks survives
    assert invoke("inspect", str(out)).exit_code == 0
    r = invoke("diff", str(ck), str(out), "--format", "json")
    assert r.exit_code == (0 if change in ("same", "added") else 1), r.stderr  # added: nothing to carry
    assert invoke("convert", str(out), "--to", "torch", "-o", str(tmp_path / "single.pt")).exit_code == 0
    r = invoke("check", str(tmp_path / "single.pt"), "--target", target)
    assert r.exit_code in (0, 1) and r.stdout, r.stderr


def test_stats_read_dcp_optimizer_tensors(ck):
    r = invoke("inspect", str(ck), "--stats", "--format", "json")
    assert r.exit_code == 0, r.stderr
    opt = json.loads(r.stdout)["optimizers"][0]
    with_state = [e for e in opt["entries"] if e["state"]]
    assert with_state and all(set(e["stats"]) >= {"exp_avg", "exp_avg_sq"} for e in with_state)
    got = optckpt.load(ck).optimizer().state["wte.weight"]["exp_avg"].load()
    assert abs(with_state[0]["stats"]["exp_avg"]["norm"] - float(got.norm())) < 1e-6
    assert opt["nonfinite_state_values"] == 0
