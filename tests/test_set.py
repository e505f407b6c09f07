"""``optckpt set``: the resumed run really trains with the new lr, step after step, under every
torch scheduler (resumed the usual way: build optimizer, build scheduler, load both)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FIXTURES, invoke

L = torch.optim.lr_scheduler


def _transformers_linear(opt):
    transformers = pytest.importorskip("transformers")
    return transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=12)


SCHEDULERS = {
    "StepLR": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[2, 5, 7], gamma=0.3),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=5, eta_min=1e-3),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=1e-3),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.2, total_iters=6),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.5, total_iters=5),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=9, power=2.0),
    "LambdaLR": lambda o: L.LambdaLR(o, lambda e: 0.95 ** e),
    "transformers-linear-warmup": _transformers_linear,
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda e: 0.9),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=[0.2, 0.1], total_steps=20),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=[0.01, 0.005], max_lr=[0.1, 0.05], step_size_up=3),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, factor=0.5, patience=0, min_lr=1e-3),
    "SequentialLR": lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.5, total_iters=2),
                                                 L.ExponentialLR(o, gamma=0.8)], milestones=[3]),
    "ChainedScheduler": lambda o: L.ChainedScheduler([L.ConstantLR(o, factor=0.5, total_iters=4),
                                                      L.ExponentialLR(o, gamma=0.9)]),
}

TRAINED, FOLLOWED = 4, 6


def _build(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.05}],
                          lr=0.1, momentum=0.9)
    return model, opt, SCHEDULERS[name](opt)


def _sched_step(sched, i):
    if isinstance(sched, L.ReduceLROnPlateau):
        sched.step(1.0)  # a plateau: reduces every step after the first
    else:
        sched.step()


def _save(tmp_path, name):
    model, opt, sched = _build(name)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for i in range(TRAINED):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        _sched_step(sched, i)
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
    return path


def _resumed_lrs(path, name):
    """The usual resume: build optimizer, build scheduler, load both; then the lrs steps really use."""
    model, opt, sched = _build(name)
    ck = torch.load(path, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    lrs = []
    for i in range(FOLLOWED):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        _sched_step(sched, TRAINED + i)
    return lrs


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scale_lr_halves_the_whole_remaining_schedule(tmp_path, name):
    path = _save(tmp_path, name)
    out = tmp_path / "half.pt"
    r = invoke("set", str(path), "--scale-lr", "0.5", "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    base, half = _resumed_lrs(path, name), _resumed_lrs(out, name)
    assert len(set(map(tuple, base))) > 1 or name == "StepLR", "the schedule should move during the check"
    for step, (b, h) in enumerate(zip(base, half)):
        for g, (x, y) in enumerate(zip(b, h)):
            assert math.isclose(y, 0.5 * x, rel_tol=1e-9, abs_tol=1e-15), (step, g, x, y)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_is_exactly_x_at_the_next_step(tmp_path, name):
    path = _save(tmp_path, name)
    out = tmp_path / "x.pt"
    r = invoke("set", str(path), "--lr", "0.0123", "--group", "0", "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    base, new = _resumed_lrs(path, name), _resumed_lrs(out, name)
    assert new[0][0] == 0.0123
    assert [lr[1] for lr in new] == [lr[1] for lr in base]  # the other group is untouched
    eta = torch.load(path, weights_only=True)["scheduler"].get("eta_min", 0)
    if not eta:  # exact follow of the whole schedule for group 0 (eta_min != 0: said in a note)
        f = 0.0123 / base[0][0]
        for b, n in zip(base, new):
            assert math.isclose(n[0], f * b[0], rel_tol=1e-9, abs_tol=1e-15)
    else:
        assert "eta_min" in r.stdout


def test_keep_mode_shows_the_naive_edit_is_undone(tmp_path):
    """The problem optckpt set solves: editing only the group lr is overridden by the scheduler."""
    path = _save(tmp_path, "LambdaLR")
    out = tmp_path / "keep.pt"
    r = invoke("set", str(path), "--scale-lr", "0.5", "--scheduler", "keep", "-o", str(out))
    assert r.exit_code == 0 and "base_lrs" in r.stdout
    base, kept = _resumed_lrs(path, "LambdaLR"), _resumed_lrs(out, "LambdaLR")
    assert math.isclose(kept[0][0], 0.5 * base[0][0])
    assert math.isclose(kept[1][0], base[1][0])  # undone after one scheduler step


def test_params_selects_whole_group_and_leaves_state_untouched(tmp_path):
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(3, 3), "classifier": torch.nn.Linear(3, 2)})
    opt = torch.optim.Adam([{"params": model["backbone"].parameters()},
                            {"params": model["classifier"].parameters(), "lr": 1e-2}], lr=1e-3)
    model["classifier"](model["backbone"](torch.ones(1, 3))).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    r = invoke("set", str(tmp_path / "a.pt"), "--params", "classifier.*", "--lr", "0.5", "--weight-decay", "0.1",
               "-o", str(tmp_path / "b.pt"), "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["groups"] == [1]
    before = torch.load(tmp_path / "a.pt", weights_only=True)["optimizer"]
    after = torch.load(tmp_path / "b.pt", weights_only=True)["optimizer"]
    assert after["param_groups"][0] == before["param_groups"][0]
    assert after["param_groups"][1]["lr"] == 0.5 and after["param_groups"][1]["weight_decay"] == 0.1
    for i, entry in before["state"].items():
        for k, v in entry.items():
            a = after["state"][i][k]
            assert torch.equal(a.view(torch.uint8) if a.ndim else a, v.view(torch.uint8) if v.ndim else v)


def test_partial_glob_refused_with_explanation(tmp_path):
    r = invoke("set", str(FIXTURES / "bundle.pt"), "--params", "classifier.*", "--lr", "0.1", "-o",
               str(tmp_path / "x.pt"))
    assert r.exit_code == 2 and "group split" in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_tsm_group_by_name_and_set_typed(tmp_path):
    out = tmp_path / "t.pth.tar"
    r = invoke("set", str(FIXTURES / "tsm_sgd.pth.tar"), "--group", "normal_bias", "--set", "lr_mult=3",
               "--set", "nesterov=true", "--scale-weight-decay", "2", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    groups = torch.load(out, weights_only=True)["optimizer"]["param_groups"]
    g = next(g for g in groups if g["name"] == "normal_bias")
    assert g["lr_mult"] == 3 and isinstance(g["lr_mult"], int) and g["nesterov"] is True
    assert next(g for g in groups if g["name"] == "normal_weight")["lr_mult"] == 1
    for bad in (["--set", "lr_mult=abc"], ["--set", "nope=1"], ["--group", "nosuch", "--lr", "1"]):
        r = invoke("set", str(FIXTURES / "tsm_sgd.pth.tar"), *bad, "-o", str(tmp_path / "y.pth.tar"))
        assert r.exit_code == 2 and r.stderr.startswith("optckpt: error:"), bad


def test_betas_tuple(tmp_path):
    r = invoke("set", str(FIXTURES / "bundle.pt"), "--set", "betas=0.9,0.95", "-o", str(tmp_path / "b.pt"))
    assert r.exit_code == 0, r.stderr
    assert torch.load(tmp_path / "b.pt", weights_only=True)["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("value", ["lr=nan", "lr=inf", "lr=-inf", "lr=-1", "weight_decay=-1", "eps=nan",
                                   "betas=2,3", "betas=0.9,1", "betas=-0.1,0.9", "betas=nan,0.9"])
def test_set_refuses_what_lr_refuses(tmp_path, value):
    """--set gets the checks --lr has: finite, >= 0 where torch requires it, betas in [0, 1); nothing written."""
    out = tmp_path / "x.pt"
    r = invoke("set", str(FIXTURES / "bundle.pt"), "--set", value, "-o", str(out))
    assert r.exit_code == 2, (value, r.stdout, r.stderr)
    assert r.stderr.startswith("optckpt: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert value.split("=")[0] in r.stderr
    assert not out.exists()


def test_set_accepts_edge_values_torch_accepts(tmp_path):
    out = tmp_path / "x.pt"
    r = invoke("set", str(FIXTURES / "bundle.pt"), "--set", "lr=0", "--set", "betas=0,0.999", "--set",
               "weight_decay=0", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    g = torch.load(out, weights_only=True)["optimizer"]["param_groups"][0]
    assert g["lr"] == 0 and g["betas"] == (0.0, 0.999) and g["weight_decay"] == 0


def test_several_optimizers_are_addressable(tmp_path):
    g, d = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), lr=2e-4), torch.optim.Adam(d.parameters(), lr=1e-4)
    torch.save({"G": g.state_dict(), "D": d.state_dict(), "optimizer_G": opt_g.state_dict(),
                "optimizer_D": opt_d.state_dict()}, tmp_path / "gan.pt")
    r = invoke("set", str(tmp_path / "gan.pt"), "--lr", "1e-3", "-o", str(tmp_path / "x.pt"))
    assert r.exit_code == 2 and "--optimizer" in r.stderr
    r = invoke("set", str(tmp_path / "gan.pt"), "--optimizer", "optimizer_D", "--lr", "1e-3", "-o",
               str(tmp_path / "x.pt"))
    assert r.exit_code == 0, r.stderr
    ck = torch.load(tmp_path / "x.pt", weights_only=True)
    assert ck["optimizer_D"]["param_groups"][0]["lr"] == 1e-3 and ck["optimizer_G"]["param_groups"][0]["lr"] == 2e-4
    r = invoke("set", str(FIXTURES / "lightning" / "last.ckpt"), "--optimizer", "optimizer_states[0]",
               "--scale-lr", "0.5", "-o", str(tmp_path / "l.ckpt"))
    assert r.exit_code == 0, r.stderr
    ck = torch.load(tmp_path / "l.ckpt", weights_only=True)
    assert ck["lr_schedulers"][0]["base_lrs"] == [0.0005]


def test_a_group_selected_by_a_unicode_digit_is_no_index(tmp_path):
    """``--group ²``: '²' is a digit to ``str.isdigit`` but no group index; one line naming it, exit 2."""
    r = invoke("set", str(FIXTURES / "bundle.pt"), "--group", "\u00b2", "--lr", "0.1", "-o", str(tmp_path / "o.pt"))
    assert r.exit_code == 2 and "--group \u00b2: no group with that index or name" in r.stderr, r.stderr
