"""Evidence that cannot contradict the checkpoint (the consistency gate), groups paired by what they
are, and model-only targets that keep the saved grouping; on real AdamW / SGD checkpoints, through the
CLI and the API. Models: ``fixtures/gate_models.py``."""

from __future__ import annotations

import json
from pathlib import Path

import gate_models as gm
import pytest
import torch
from conftest import ROOT, invoke
from safetensors.torch import save_file

import optckpt
from optckpt.errors import MappingError

G = str(ROOT / "fixtures" / "gate_models.py")


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched=None, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, model.fc.in_features if hasattr(model, "fc") else 16, generator=g)).square().mean() \
            .backward()
        opt.step()
        if sched is not None:
            sched.step()


def _truth(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, dict], dict[str, dict]]:
    """Each parameter's saved state and its group's hyperparameters, by name."""
    name = {id(p): n for n, p in model.named_parameters()}
    state, hp = {}, {}
    for g in opt.param_groups:
        for p in g["params"]:
            state[name[id(p)]] = {k: v.clone() for k, v in opt.state[p].items()}
            hp[name[id(p)]] = {k: v for k, v in g.items() if k not in ("params", "param_names")}
    return state, hp


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory) -> tuple[Path, dict, dict]:
    """AdamW with decay / no-decay groups, saved three ways: an accelerate-style directory
    (optimizer.pt + model.safetensors, no registration order), the optimizer alone, a bundle."""
    d = tmp_path_factory.mktemp("adamw")
    model, opt = gm.mlp_adamw()
    _train(model, opt)
    (d / "dir").mkdir()
    torch.save(opt.state_dict(), d / "dir" / "optimizer.pt")
    save_file(model.state_dict(), str(d / "dir" / "model.safetensors"))
    torch.save(opt.state_dict(), d / "alone.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, d / "bundle.pt")
    state, hp = _truth(model, opt)
    return d, state, hp


def _optimizer_of(out: Path) -> dict:
    p = out / "optimizer.pt" if out.is_dir() else out
    sd = torch.load(p, weights_only=True)
    return sd.get("optimizer", sd)


def _assert_each_own(sd: dict, state: dict, hp: dict, old_name=lambda n: n) -> None:
    """Every parameter of the written optimizer holds its own saved state and its own group's
    weight decay, checked by name."""
    i = 0
    for g in sd["param_groups"]:
        for n in g["param_names"]:
            own = state[old_name(n)]
            got = sd["state"][g["params"][g["param_names"].index(n)]]
            assert set(got) == set(own), n
            for k in own:
                assert torch.equal(got[k], own[k]), f"{n}: {k} is not its own"
            assert g["weight_decay"] == hp[old_name(n)]["weight_decay"], n
            i += 1
    assert i == len(state)


@pytest.mark.parametrize("layout", ["dir", "alone.pt"])
@pytest.mark.parametrize("renamed", [False, True])
def test_old_model_class_as_source_names_every_parameter_right(adamw_run, tmp_path, layout, renamed):
    """The reported repro: --source the old model *class* (no optimizer) on decay / no-decay AdamW. Its
    parameter order is not the optimizer's: it is aligned per saved group, never cut by position."""
    d, state, hp = adamw_run
    target = f"{G}:mlp_renamed" if renamed else f"{G}:mlp"
    extra = ["--rename", "fc1.=encoder."] if renamed else []
    out = tmp_path / ("out" if layout == "dir" else "out.pt")
    r = invoke("remap", str(d / layout), "--target", target, "--source", f"{G}:MLP", *extra, "-o", str(out))
    assert r.exit_code == 0, r.output
    _assert_each_own(_optimizer_of(out), state, hp, (lambda n: n.replace("encoder.", "fc1.")) if renamed else str)
    r = invoke("check", str(out), "--target", target, "--format", "json")
    assert json.loads(r.stdout)["verdict"] in ("safe", "cannot_prove_safe"), r.stdout


@pytest.mark.parametrize("source", ["other", "mlp_one_group", "shuffled"])
def test_a_source_that_contradicts_the_checkpoint_is_not_used(adamw_run, tmp_path, source):
    """Another model's shapes, the old class grouped another way, a shuffled names file: rejected, named
    in the refusal (the checkpoint alone cannot name the 32-wide vectors) — never another's state."""
    d, state, hp = adamw_run
    if source == "shuffled":
        names = ["fc2.weight", "fc1.weight", "head.weight", "fc1.bias", "fc2.bias", "norm.weight", "norm.bias",
                 "head.bias"]
        spec = str(tmp_path / "names.json")
        Path(spec).write_text(json.dumps(names))
    else:
        spec = f"{G}:{source}"
    for layout in ("dir", "alone.pt"):
        out = tmp_path / f"out_{layout}"
        r = invoke("remap", str(d / layout), "--target", f"{G}:mlp", "--source", spec, "-o", str(out))
        assert r.exit_code == 2 and not out.exists(), r.output
        assert "source rejected" in r.stderr and "uncertain names" in r.stderr, r.stderr
    # with a model saved in registration order the checkpoint names everything itself: the wrong source
    # is rejected (and said), the output right
    out = tmp_path / "bundle_out.pt"
    r = invoke("remap", str(d / "bundle.pt"), "--target", f"{G}:mlp", "--source", spec, "-o", str(out))
    assert r.exit_code == 0 and "rejected" in r.output, r.output
    _assert_each_own(_optimizer_of(out), state, hp)


def test_api_source_names_in_module_order_is_refused_not_misapplied(adamw_run):
    d, state, _ = adamw_run
    model, opt = gm.mlp_adamw()
    module_order = [n for n, _ in model.named_parameters()]  # not the optimizer's order: groups exist
    with pytest.raises(MappingError, match="source rejected"):
        optckpt.load_optimizer_state_dict(opt, model, d / "alone.pt", source_names=module_order)
    assert not opt.state  # nothing loaded


# --- groups paired by what they are -----------------------------------------------------------------

def _sgd_checkpoint(path: Path, scheduled: bool) -> None:
    model, opt = gm.sgd_old()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5) if scheduled else None
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        opt.step()
        if sched is not None:
            sched.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)


def test_stateless_sgd_with_swapped_groups(tmp_path):
    """SGD without momentum, two groups with their own lr, listed in the other order by the new code:
    the groups pair by their hyperparameters (certain here), so check is not SAFE and remap gives each
    parameter its own group's lr."""
    ck = tmp_path / "sgd.pt"
    _sgd_checkpoint(ck, scheduled=False)
    r = invoke("check", str(ck), "--target", f"{G}:sgd_swapped", "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and rep["verdict"] == "would_misapply", rep
    out = tmp_path / "out.pt"
    assert invoke("remap", str(ck), "--target", f"{G}:sgd_swapped", "-o", str(out)).exit_code == 0
    lr = {n: g["lr"] for g in _optimizer_of(out)["param_groups"] for n in g["param_names"]}
    assert lr == {"fc.weight": 1e-3, "head.weight": 1e-3, "fc.bias": 0.05, "head.bias": 0.05}
    # and the new code resumes with it by plain load_state_dict
    model, opt = gm.sgd_swapped()
    opt.load_state_dict(_optimizer_of(out))
    assert [g["lr"] for g in opt.param_groups] == [0.05, 1e-3]


def test_stateless_sgd_with_swapped_scheduled_groups_is_refused(tmp_path):
    """The same after a StepLR: the saved lr no longer equal the new code's, nothing is certain, so
    check does not say SAFE and remap / the API refuse rather than pair by position."""
    ck = tmp_path / "sgd.pt"
    _sgd_checkpoint(ck, scheduled=True)
    r = invoke("check", str(ck), "--target", f"{G}:sgd_swapped", "--format", "json")
    assert r.exit_code == 1 and json.loads(r.stdout)["verdict"] != "safe"
    r = invoke("remap", str(ck), "--target", f"{G}:sgd_swapped", "-o", str(tmp_path / "out.pt"))
    assert r.exit_code == 2 and "cannot be paired" in r.stderr, r.output
    model, opt = gm.sgd_swapped()
    with pytest.raises(MappingError, match="cannot be paired"):
        optckpt.load_optimizer_state_dict(opt, model, ck)
    # the old code as --source settles it exactly
    out = tmp_path / "fixed.pt"
    r = invoke("remap", str(ck), "--target", f"{G}:sgd_swapped", "--source", f"{G}:sgd_old", "-o", str(out))
    assert r.exit_code == 0, r.output
    saved = torch.load(ck, weights_only=True)["optimizer"]["param_groups"]
    lr = {n: g["lr"] for g in _optimizer_of(out)["param_groups"] for n in g["param_names"]}
    assert lr == {"fc.weight": saved[0]["lr"], "head.weight": saved[0]["lr"],
                  "fc.bias": saved[1]["lr"], "head.bias": saved[1]["lr"]}


# --- model-only targets -------------------------------------------------------------------------------

def test_model_only_target_on_unchanged_code_is_safe(adamw_run):
    d, _, _ = adamw_run
    r = invoke("check", str(d / "bundle.pt"), "--target", f"{G}:mlp", "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["verdict"] == "safe", rep
    assert any("the target has no optimizer: assuming the saved grouping" in n for n in rep["notes"])
    # without a registration order some names stay uncertain; nothing is at risk of being misapplied
    r = invoke("check", str(d / "dir"), "--target", f"{G}:mlp", "--format", "json")
    rep = json.loads(r.stdout)
    assert rep["verdict"] in ("safe", "cannot_prove_safe") and not rep["groups"]["load_would_fail"], rep
    assert all(p["risk"] != "misapplied" for p in rep["params"])


def test_model_only_target_places_a_new_layer_by_the_saved_grouping(adamw_run, tmp_path):
    """A new nn.Linear: its weight joins the decay group and its bias the no-decay group (a rule learned
    from the saved grouping), so the new code's own AdamW(decay_groups(model)) loads the result."""
    d, state, hp = adamw_run
    out = tmp_path / "grown.pt"
    r = invoke("remap", str(d / "bundle.pt"), "--target", f"{G}:mlp_grown", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "extra.weight joins saved group 0" in r.output and "extra.bias joins saved group 1" in r.output
    sd = torch.load(out, weights_only=True)
    model, opt = gm.mlp_grown_adamw()
    opt.load_state_dict(sd["optimizer"])  # plain torch: group sizes and shapes agree
    model.load_state_dict(sd["model"])
    name = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = name[id(p)]
            if n.startswith("extra."):
                assert not opt.state[p] and g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
            else:
                assert g["weight_decay"] == hp[n]["weight_decay"]
                assert all(torch.equal(opt.state[p][k], v) for k, v in state[n].items()), n
    _train(model, opt, steps=1)  # the resumed optimizer steps


def test_a_new_parameter_no_rule_places_is_refused(tmp_path):
    """Saved groups that no feature separates (parameters picked by hand): a new parameter's group
    cannot be learned, so remap with a model-only target refuses instead of guessing."""
    torch.manual_seed(0)
    model = gm.MLP()
    picked = [model.fc1.weight, model.head.weight, model.head.bias]  # a mixed bag
    rest = [p for p in model.parameters() if all(p is not q for q in picked)]
    opt = torch.optim.AdamW([{"params": rest}, {"params": picked, "lr": 0.5}], lr=1e-2)
    _train(model, opt)
    ck = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ck)
    r = invoke("remap", str(ck), "--target", f"{G}:mlp_grown", "-o", str(tmp_path / "out.pt"))
    assert r.exit_code == 2 and "no rule learned from the saved grouping" in r.stderr, r.output
    r = invoke("remap", str(ck), "--target", f"{G}:mlp_grown_adamw", "-o", str(tmp_path / "out.pt"))
    assert r.exit_code == 0, r.output  # with the new code's optimizer the grouping is known


# --- convert keeps what it read -------------------------------------------------------------------

def test_convert_keeps_every_entry(tmp_path):
    model, opt = gm.mlp_adamw()
    _train(model, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    rng = torch.get_rng_state()
    bundle = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "epoch": 3, "notes": {"run": "a", "tags": ["x", "y"], "n": 2}, "ema_decay": 0.999, "rng_state": rng}
    torch.save(bundle, tmp_path / "b.pt")
    r = invoke("convert", str(tmp_path / "b.pt"), "--to", "torch", "-o", str(tmp_path / "c.pt"))
    assert r.exit_code == 0, r.output
    got = torch.load(tmp_path / "c.pt", weights_only=True)
    assert got["extra"]["epoch"] == 3 and got["extra"]["ema_decay"] == 0.999
    assert got["extra"]["notes"] == {"run": "a", "tags": ["x", "y"], "n": 2}
    assert torch.equal(got["extra"]["rng_state"], rng)
    assert got["lr_scheduler"] == sched.state_dict()
    # and through DCP and back, every entry survives
    assert invoke("convert", str(tmp_path / "b.pt"), "--to", "dcp", "-o", str(tmp_path / "d")).exit_code == 0
    r = invoke("convert", str(tmp_path / "d"), "--to", "torch", "-o", str(tmp_path / "e.pt"))
    assert r.exit_code == 0, r.output
    back = torch.load(tmp_path / "e.pt", weights_only=True)["extra"]
    assert torch.equal(back["rng_state"], rng) and back["epoch"] == 3


def test_convert_refuses_what_it_cannot_carry(tmp_path):
    """An HF Trainer directory holds files no weights-only load reads (rng_state.pth with numpy arrays,
    training_args.bin): convert names them and writes nothing, rather than dropping them."""
    src = ROOT / "fixtures" / "hf_trainer" / "checkpoint-3"
    r = invoke("convert", str(src), "--to", "torch", "-o", str(tmp_path / "x.pt"))
    assert r.exit_code == 2 and "rng_state.pth" in r.stderr and not (tmp_path / "x.pt").exists(), r.output
