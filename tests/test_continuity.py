"""Training continuity, the ground truth for remapping: train, save, change the model code, repair,
resume, take one more step, and compare every parameter with the uninterrupted run."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from conftest import FIXTURES, ROOT, invoke, run_cli
from models_zoo import BlockReordered, TinyGPT, TwoSame, decay_groups, gpt_loss
from torch import nn

import optckpt

sys.path.insert(0, str(FIXTURES))
from models import Model, Model2  # noqa: E402

ZOO = str(ROOT / "tests" / "models_zoo.py")

OPTIMIZERS: dict[str, Callable[[object], torch.optim.Optimizer]] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2, t0=1),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.9),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
}


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int, loss_fn) -> None:
    def closure():
        opt.zero_grad()
        loss = loss_fn(model, seed)
        loss.backward()
        return loss

    opt.step(closure)


def _seed_loss(model: nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(seed))
    return (model(x) - 1).square().mean()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


def _run(tmp_path, old_cls, new_cls, make_opt, loss_fn, how: str, target: str, steps: int = 3,
         new_opt=None, ckpt_layout: str = "bundle") -> None:
    torch.manual_seed(0)
    old = old_cls()
    opt = make_opt(old.parameters())
    for s in range(steps):
        _step(old, opt, s, loss_fn)
    if ckpt_layout == "bundle":
        ck = tmp_path / "ck.pt"
        torch.save({"model": old.state_dict(), "optimizer": opt.state_dict(), "epoch": steps}, ck)
        extra: list[str] = []
    else:  # the seed layout: two files
        ck = tmp_path / "optimizer_0.pth"
        torch.save(opt.state_dict(), ck)
        torch.save(old.state_dict(), tmp_path / "model_0.pth")
        extra = ["--model", str(tmp_path / "model_0.pth")]
    saved_model = {k: v.clone() for k, v in old.state_dict().items()}
    _step(old, opt, steps, loss_fn)  # the uninterrupted run
    reference = _params(old)

    new = new_cls()
    new.load_state_dict(saved_model)  # model weights are name-keyed already
    new_optimizer = new_opt(new) if new_opt else make_opt(new.parameters())
    if how == "cli":
        out = tmp_path / "fixed.pt"
        r = invoke("remap", str(ck), *extra, "--target", target, "-o", str(out))
        assert r.exit_code == 0, r.stdout + r.stderr
        sd = torch.load(out, weights_only=True)
        new_optimizer.load_state_dict(sd["optimizer"] if ckpt_layout == "bundle" else sd)  # the unchanged resume
    else:
        src = str(ck)
        if ckpt_layout == "bundle":
            report = optckpt.load_optimizer_state_dict(new_optimizer, new, src)
        else:
            report = optckpt.load_optimizer_state_dict(
                new_optimizer, new, torch.load(src, weights_only=True),
                model_state_dict=torch.load(tmp_path / "model_0.pth", weights_only=True))
        assert report.clean, report
    _step(new, new_optimizer, steps, loss_fn)
    _assert_same(_params(new), reference)


@pytest.mark.parametrize("how", ["cli", "api"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_every_optimizer_seed_models(tmp_path, opt_name, how):
    """Model -> Model2 (layers registered in the other order), for every torch.optim optimizer."""
    _run(tmp_path, Model, Model2, OPTIMIZERS[opt_name], _seed_loss, how,
         target=str(FIXTURES / "models.py") + ":build_model2")


@pytest.mark.parametrize("how", ["cli", "api"])
def test_seed_layout_two_files(tmp_path, how):
    _run(tmp_path, Model, Model2, OPTIMIZERS["Adam"], _seed_loss, how,
         target=str(FIXTURES / "models.py") + ":build_model2", ckpt_layout="seed")


def test_plain_load_without_repair_really_diverges(tmp_path):
    """The control: the same resume without optckpt crashes (so the tests above can fail)."""
    torch.manual_seed(0)
    old = Model()
    opt = torch.optim.Adam(old.parameters(), lr=1e-2)
    _step(old, opt, 0, _seed_loss)
    new = Model2()
    new.load_state_dict(old.state_dict())
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    new_opt.load_state_dict(opt.state_dict())
    with pytest.raises(RuntimeError):
        _step(new, new_opt, 1, _seed_loss)


def _two_loss(model, seed):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
    return (model(x) - 0.5).square().mean()


@pytest.mark.parametrize("how", ["cli", "api"])
def test_silent_swap_of_same_shaped_layers(tmp_path, how):
    target_file = tmp_path / "two.py"
    target_file.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom models_zoo import TwoSame\n"
        "def build():\n    return TwoSame(swap=True)\n")
    _run(tmp_path, TwoSame, lambda: TwoSame(swap=True), OPTIMIZERS["AdamW"], _two_loss, how,
         target=f"{target_file}:build")


def _gpt_loss(model, seed):
    return gpt_loss(model, seed)


@pytest.mark.parametrize("how", ["cli", "api"])
@pytest.mark.parametrize("variant", ["reordered_blocks", "head_first"])
def test_transformer_changes(tmp_path, how, variant):
    new_cls = {"reordered_blocks": lambda: TinyGPT(n_layer=3, block=BlockReordered),
               "head_first": lambda: TinyGPT(n_layer=3, head_first=True)}[variant]
    target = {"reordered_blocks": f"{ZOO}:gpt_reordered_blocks", "head_first": f"{ZOO}:gpt_head_first"}[variant]
    _run(tmp_path, lambda: TinyGPT(n_layer=3), new_cls, OPTIMIZERS["Adam"], _gpt_loss, how, target=target)


@pytest.mark.parametrize("how", ["cli", "api"])
def test_param_group_construction_changed(tmp_path, how):
    """Old: decay / no-decay groups. New: reordered blocks and groups rebuilt in the new order."""
    def make_old_opt(params):
        return torch.optim.AdamW(params, lr=1e-2)

    torch.manual_seed(0)
    old = TinyGPT(n_layer=3)
    opt = torch.optim.AdamW(decay_groups(old), lr=1e-2)
    for s in range(3):
        _step(old, opt, s, _gpt_loss)
    ck = tmp_path / "ck.pt"
    torch.save({"model": old.state_dict(), "optimizer": opt.state_dict()}, ck)
    saved = {k: v.clone() for k, v in old.state_dict().items()}
    _step(old, opt, 3, _gpt_loss)
    reference = _params(old)
    new = TinyGPT(n_layer=3, block=BlockReordered)
    new.load_state_dict(saved)
    new_opt = torch.optim.AdamW(decay_groups(new), lr=1e-2)
    if how == "cli":
        out = tmp_path / "fixed.pt"
        r = invoke("remap", str(ck), "--target", f"{ZOO}:gpt_reordered_with_decay_groups", "-o", str(out))
        assert r.exit_code == 0, r.stdout + r.stderr
        new_opt.load_state_dict(torch.load(out, weights_only=True)["optimizer"])
    else:
        assert optckpt.load_optimizer_state_dict(new_opt, new, str(ck)).clean
    _step(new, new_opt, 3, _gpt_loss)
    _assert_same(_params(new), reference)


def test_lbfgs_reordered_keeps_history(tmp_path):
    """LBFGS's flat history vectors are permuted segment by segment."""
    _run(tmp_path, Model, Model2, lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4, history_size=5),
         _seed_loss, "api", target="", steps=2)


def test_lbfgs_cli(tmp_path):
    _run(tmp_path, Model, Model2, lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4, history_size=5),
         _seed_loss, "cli", target=str(FIXTURES / "models.py") + ":build_model2", steps=2)


def test_new_and_removed_layers(tmp_path):
    """New layers get fresh state, removed layers' state is dropped, and the report says so."""
    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(2, 3)
            self.aux = nn.Linear(3, 3)
            self.dec = nn.Linear(3, 2)

        def forward(self, x):
            return self.dec(self.enc(x)) + 0 * self.aux(self.enc(x)).sum()

    class New(nn.Module):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)
            self.dec = nn.Linear(3, 2)
            self.enc = nn.Linear(2, 3)

        def forward(self, x):
            return self.dec(self.enc(x)) + self.extra(x)

    torch.manual_seed(0)
    old = Old()
    opt = torch.optim.Adam(old.parameters(), lr=1e-2)
    for s in range(2):
        _step(old, opt, s, _seed_loss)
    ck = tmp_path / "ck.pt"
    torch.save({"model": old.state_dict(), "optimizer": opt.state_dict()}, ck)
    new = New()
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    rep = optckpt.load_optimizer_state_dict(new_opt, new, str(ck))
    assert sorted(rep.missing) == ["extra.bias", "extra.weight"]
    assert sorted(rep.unexpected) == ["aux.bias", "aux.weight"]
    assert sorted(rep.moved) == ["dec.bias", "dec.weight", "enc.bias", "enc.weight"]
    state = new_opt.state_dict()["state"]
    names = [n for n, _ in new.named_parameters()]
    for i, n in enumerate(names):
        if n.startswith("extra"):
            assert i not in state  # fresh: created at the next step
        else:
            old_i = [k for k, _ in old.named_parameters()].index(n)
            assert torch.equal(state[i]["exp_avg"], opt.state_dict()["state"][old_i]["exp_avg"])
    with pytest.raises(optckpt.MappingError):
        optckpt.load_optimizer_state_dict(torch.optim.Adam(new.parameters()), new, str(ck), strict=True)


def test_cli_subprocess_roundtrip(tmp_path):
    """A real subprocess run of remap on the seed fixture, then the unchanged plain resume."""
    out = tmp_path / "optimizer_fixed.pth"
    r = run_cli("remap", "seed/optimizer_0.pth", "--model", "seed/model_0.pth", "--target",
                "models.py:build_model2", "-o", str(out), cwd=FIXTURES)
    assert r.returncode == 0, r.stderr
    m2 = Model2()
    m2.load_state_dict(torch.load(FIXTURES / "seed" / "model_0.pth", weights_only=True))
    opt = torch.optim.Adam(m2.parameters())
    opt.load_state_dict(torch.load(out, weights_only=True))
    _step(m2, opt, 0, _seed_loss)  # no crash, and the moments are linear2's own
    assert (FIXTURES / "seed" / "optimizer_0.pth").read_bytes()  # input untouched (checked below too)


def test_lbfgs_control_plain_load_silently_diverges(tmp_path):
    """Without the segment permutation LBFGS does not crash: it quietly takes a different step."""
    torch.manual_seed(0)
    old = Model()
    opt = torch.optim.LBFGS(old.parameters(), lr=0.5, max_iter=4, history_size=5)
    for s in range(2):
        _step(old, opt, s, _seed_loss)
    saved_model, saved_opt = old.state_dict(), opt.state_dict()
    saved_model = {k: v.clone() for k, v in saved_model.items()}
    _step(old, opt, 2, _seed_loss)
    new = Model2()
    new.load_state_dict(saved_model)
    new_opt = torch.optim.LBFGS(new.parameters(), lr=0.5, max_iter=4, history_size=5)
    new_opt.load_state_dict(saved_opt)
    _step(new, new_opt, 2, _seed_loss)
    assert any(not torch.allclose(p, _params(old)[n], atol=1e-6) for n, p in _params(new).items())


def test_enable_load_by_name_keeps_plain_load_state_dict_calls_right(tmp_path):
    """The one-liner: after enable_load_by_name, the script's own optimizer.load_state_dict is by name."""
    torch.manual_seed(0)
    old = Model()
    opt = torch.optim.Adam(old.parameters(), lr=1e-2)
    optckpt.enable_load_by_name(opt, old)
    for s in range(2):
        _step(old, opt, s, _seed_loss)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in old.named_parameters()]
    torch.save({"model": old.state_dict(), "optimizer": sd}, tmp_path / "ck.pt")
    _step(old, opt, 2, _seed_loss)
    reference = _params(old)
    new = Model2()
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    new.load_state_dict(ck["model"])
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    optckpt.enable_load_by_name(new_opt, new)
    new_opt.load_state_dict(ck["optimizer"])  # the unchanged resume line
    _step(new, new_opt, 2, _seed_loss)
    _assert_same(_params(new), reference)
    bare = torch.optim.Adam(Model2().parameters())
    optckpt.enable_load_by_name(bare, Model2())
    index_only = {"state": {}, "param_groups": [{**ck["optimizer"]["param_groups"][0]}]}
    index_only["param_groups"][0].pop("param_names")
    with pytest.raises(optckpt.MappingError):
        bare.load_state_dict(index_only)  # no names: refusing beats guessing
