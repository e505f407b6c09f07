"""The seed systems' own checkpoints end to end: train a tiny version with the real loop shape,
save exactly as the system does, change the code, repair, resume, compare with the uninterrupted run."""

from __future__ import annotations

import json

import seed_systems as S  # fixtures/ is on sys.path (conftest)
import torch
from conftest import FIXTURES, invoke
from models import SmallCNN, SmallCNNHeadFirst, tsm_policies
from torch import nn

import optckpt

SS = str(FIXTURES / "seed_systems.py")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# --- NeRF ----------------------------------------------------------------------------------------

def _nerf_step(model, model_fine, optimizer, seed):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(seed))
    loss = model(x).square().mean() + model_fine(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _nerf_params(model, model_fine):
    return {**{f"fn.{k}": v.detach().clone() for k, v in model.named_parameters()},
            **{f"fine.{k}": v.detach().clone() for k, v in model_fine.named_parameters()}}


def test_nerf_joint_optimizer(tmp_path):
    torch.manual_seed(0)
    model, model_fine, optimizer = S.nerf_create()
    for s in range(3):
        _nerf_step(model, model_fine, optimizer, s)
    path = tmp_path / "000003.tar"
    torch.save({"global_step": 3, "network_fn_state_dict": model.state_dict(),
                "network_fine_state_dict": model_fine.state_dict(),
                "optimizer_state_dict": optimizer.state_dict()}, path)
    _nerf_step(model, model_fine, optimizer, 3)
    reference = _nerf_params(model, model_fine)

    r = invoke("check", str(path), "--target", f"{SS}:nerf_new", "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and rep["counts"]["moved"] > 0 and rep["counts"]["ambiguous"] == 0, r.stdout
    out = tmp_path / "fixed.tar"
    assert invoke("remap", str(path), "--target", f"{SS}:nerf_new", "-o", str(out)).exit_code == 0
    for how in ("cli", "api"):
        m, mf, opt = S.nerf_create(S.NeRFReordered)
        ckpt = torch.load(out if how == "cli" else path, weights_only=True)  # nerf-pytorch's resume
        m.load_state_dict(ckpt["network_fn_state_dict"])
        mf.load_state_dict(ckpt["network_fine_state_dict"])
        if how == "cli":
            opt.load_state_dict(ckpt["optimizer_state_dict"])
        else:
            report = optckpt.load_optimizer_state_dict(opt, nn.ModuleDict({"network_fn": m, "network_fine": mf}),
                                                       str(path))
            assert report.clean and report.moved
        _nerf_step(m, mf, opt, 3)
        _close(_nerf_params(m, mf), reference)


# --- 3D Gaussian Splatting -----------------------------------------------------------------------

def test_gaussian_splatting_named_groups(tmp_path):
    gm = S.GaussianModel()
    gm.training_setup()
    for it in range(3):
        gm.optimizer.zero_grad()
        gm.loss(it).backward()
        gm.optimizer.step()
    path = tmp_path / "chkpnt3.pth"
    torch.save((gm.capture(), 3), path)
    gm.optimizer.zero_grad()
    gm.loss(3).backward()
    gm.optimizer.step()
    reference = {k: v.detach().clone() for k, v in gm.params().items() if k in S.GS_NEW_GROUPS}

    r = invoke("check", str(path), "--target", f"{SS}:gs_new", "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1
    st = {p["name"]: p["status"] for p in rep["params"]}
    assert st["f_rest"] == "unexpected" and st["xyz"] == "moved" and rep["counts"]["ambiguous"] == 0
    out = tmp_path / "fixed.pth"
    r = invoke("remap", str(path), "--target", f"{SS}:gs_new", "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    (model_args, first_iter) = torch.load(out, weights_only=True)  # 3DGS's own restore path
    assert first_iter == 3
    new = S.GaussianModel(groups=S.GS_NEW_GROUPS)
    new.restore(model_args)
    new.optimizer.zero_grad()
    new.loss(3).backward()
    new.optimizer.step()
    _close({k: v.detach() for k, v in new.params().items() if k in S.GS_NEW_GROUPS}, reference)
    # every group kept its own lr, found by name
    assert {g["name"]: g["lr"] for g in new.optimizer.param_groups}["f_dc"] == 0.0025

    # the API with bare parameters: names come from the groups
    (model_args, _) = torch.load(path, weights_only=True)
    api = S.GaussianModel(groups=S.GS_NEW_GROUPS)
    api.restore(model_args, load_optimizer=False)
    report = optckpt.load_optimizer_state_dict(api.optimizer, None, str(path))
    assert report.unexpected == ["f_rest"] and not report.missing
    api.optimizer.zero_grad()
    api.loss(3).backward()
    api.optimizer.step()
    _close({k: v.detach() for k, v in api.params().items() if k in S.GS_NEW_GROUPS}, reference)


# --- TSM -----------------------------------------------------------------------------------------

def _cnn_step(model, opt, seed):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _named(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_tsm_policies_with_manual_schedule(tmp_path):
    model, opt = S.tsm_old()
    for epoch in range(3):
        S.adjust_learning_rate(opt, epoch)
        _cnn_step(model, opt, epoch)
    path = tmp_path / "tsm_checkpoint.pth.tar"
    torch.save({"epoch": 3, "arch": "SmallCNN", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                "best_prec1": 0.0}, path)
    S.adjust_learning_rate(opt, 3)
    _cnn_step(model, opt, 3)
    reference = _named(model)

    # names are not provable from shapes + order alone (several (4,) parameters): honest...
    r = invoke("check", str(path), "--target", f"{SS}:tsm_new", "--no-group-evidence", "--format", "json")
    assert json.loads(r.stdout)["counts"]["ambiguous"] > 0
    # ...but the new code's policy groups (same names, same shapes per group) settle them
    r = invoke("check", str(path), "--target", f"{SS}:tsm_new", "--format", "json")
    rep = json.loads(r.stdout)
    assert rep["counts"]["ambiguous"] == 0 and rep["verdict"] == "would_misapply" and r.exit_code == 1
    assert "group-structure" in {p["evidence"] for p in rep["params"]}
    out = tmp_path / "fixed.pth.tar"
    r = invoke("remap", str(path), "--target", f"{SS}:tsm_new", "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    new, new_opt = S.tsm_new()
    ck = torch.load(out, weights_only=True)
    new.load_state_dict(ck["state_dict"])
    new_opt.load_state_dict(ck["optimizer"])
    assert [g["name"] for g in new_opt.param_groups] == [g["name"] for g in opt.param_groups]
    S.adjust_learning_rate(new_opt, 3)
    _cnn_step(new, new_opt, 3)
    _close(_named(new), reference)


# --- per-layer lr picked by id() -------------------------------------------------------------------

def test_id_filtered_groups(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = S.id_filter_optimizer(model)
    for s in range(2):
        _cnn_step(model, opt, s)
    path = tmp_path / "ck.pth"
    torch.save({"epoch": 2, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path)
    old_names = {id(p): n for n, p in model.named_parameters()}
    source = tmp_path / "old_names.json"  # the old order, as the old code would print it
    source.write_text(json.dumps([[old_names[id(p)] for p in g["params"]] for g in opt.param_groups]))
    _cnn_step(model, opt, 2)
    reference = _named(model)

    out = tmp_path / "fixed.pth"
    r = invoke("remap", str(path), "--target", f"{SS}:id_filter_new", "--source", str(source), "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    new, new_opt = S.id_filter_new()
    ck = torch.load(out, weights_only=True)
    new.load_state_dict(ck["state_dict"])
    new_opt.load_state_dict(ck["optimizer"])
    _cnn_step(new, new_opt, 2)
    _close(_named(new), reference)


# --- rebuilding the optimizer with a new grouping keeps every moment --------------------------------

def test_rebuilt_optimizer_keeps_every_moment(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for s in range(2):
        _cnn_step(model, opt, s)
    path = tmp_path / "ck.pth"
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path)
    new = SmallCNNHeadFirst()
    new.load_state_dict(model.state_dict())
    new_opt = torch.optim.SGD(tsm_policies(new), lr=0.01, momentum=0.9)  # a whole new grouping
    report = optckpt.load_optimizer_state_dict(new_opt, new, str(path))
    assert report.clean
    old_buf = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    new_names = {id(p): n for n, p in new.named_parameters()}
    for g in new_opt.param_groups:
        for p in g["params"]:
            assert torch.equal(new_opt.state[p]["momentum_buffer"], old_buf[new_names[id(p)]])


# --- inspect shows the right names on the committed fixtures --------------------------------------------

def test_inspect_names_on_seed_fixtures():
    rep = json.loads(invoke("inspect", str(FIXTURES / "nerf" / "000003.tar"), "--format", "json").stdout)
    names = [e["inferred_name"] for e in rep["optimizers"][0]["entries"]]
    assert names[0] == "network_fn.pts_linears.0.weight" and names[-1] == "network_fine.rgb_linear.bias"
    assert None not in names
    rep = json.loads(invoke("inspect", str(FIXTURES / "gaussians" / "chkpnt3.pth"), "--format", "json").stdout)
    assert [e["inferred_name"] for e in rep["optimizers"][0]["entries"]] == list(S.GaussianModel.GROUPS)
    assert rep["optimizers"][0]["name"] == "[0][10]"
    rep = json.loads(invoke("inspect", str(FIXTURES / "per_layer_lr.pth"), "--format", "json").stdout)
    entries = rep["optimizers"][0]["entries"]
    assert entries[0]["inferred_name"] == "conv.weight" and entries[4]["inferred_name"] == "conv2.weight"
    assert any("not in the model's order" in n for n in rep["optimizers"][0]["notes"])
