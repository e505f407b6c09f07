"""Community optimizers (``pytorch-optimizer``): exact or refused, never wrong.

Each optimizer trains a small model with two param groups (decay / no-decay) and is saved with its
model; the new code registers the modules in another order and lists the two groups the other way
round. The checkpoint is repaired with ``optckpt remap`` (and, separately, loaded through the API),
the new code resumes, and two more steps must equal the uninterrupted run parameter by parameter —
or optckpt refuses in one line. Covered: state keys optckpt does not know (A2Grad's ``avg_grad``),
flattened moments beside a parameter-shaped mask (SPAM), global entries in ``state`` (MADGRAD's
``k``), plain Lion, and a stateless optimizer whose groups differ only in their hyperparameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import invoke
from torch import nn

import optckpt

po = pytest.importorskip("pytorch_optimizer")

NAMES = ["A2Grad", "MADGRAD", "SPAM", "Lion", "SGDW"]


class Net(nn.Module):
    def __init__(self, reordered: bool = False):
        super().__init__()
        torch.manual_seed(0)
        a, b, n = nn.Linear(4, 6), nn.Linear(6, 12), nn.LayerNorm(12)
        if reordered:
            self.norm, self.fc2, self.fc1 = n, b, a
        else:
            self.fc1, self.fc2, self.norm = a, b, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


def _groups(model: nn.Module, swap: bool = False) -> list[dict]:
    named = list(model.named_parameters())  # in model order, as training code builds them
    g = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return g[::-1] if swap else g


def _make(name: str, model: nn.Module, swap: bool = False) -> torch.optim.Optimizer:
    cls = getattr(po, name)
    kwargs = {"lr": 1e-2}
    if name == "A2Grad":
        kwargs = {}
    return cls(_groups(model, swap), **kwargs)


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    opt.zero_grad()
    model(torch.randn(8, 4, generator=g)).square().mean().backward()
    opt.step()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


@pytest.fixture(params=NAMES)
def trained(request, tmp_path):
    name = request.param
    model = Net()
    opt = _make(name, model)
    for i in range(3):
        _step(model, opt, i)
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    for i in range(3, 5):
        _step(model, opt, i)
    return name, path, _params(model), tmp_path


def _resume(name: str, sd: dict) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Net(reordered=True)
    model.load_state_dict(sd["model"])
    return model, _make(name, model, swap=True)


def test_remap_resumes_exactly_or_refuses(trained, monkeypatch):
    name, path, ref, tmp = trained
    spec = tmp / "new_code.py"
    here = str(Path(__file__).parent)
    spec.write_text(
        f"import sys\nsys.path.insert(0, {here!r})\n"
        + "from test_community_optimizers import Net, _make\n"
        + f"def build():\n    m = Net(reordered=True)\n    return m, _make({name!r}, m, swap=True)\n")
    out = tmp / "fixed.pt"
    r = invoke("remap", str(path), "--target", f"{spec}:build", "-o", str(out))
    if r.exit_code == 2:
        assert r.stderr.startswith("optckpt: error: ") and r.stderr.count("\n") == 1, r.stderr
        pytest.skip(f"{name}: refused in one line: {r.stderr.strip()}")  # honest refusal, counted as such
    assert r.exit_code == 0, r.output
    sd = torch.load(out, weights_only=True)
    model, opt = _resume(name, sd)
    opt.load_state_dict(sd["optimizer"])  # the unchanged resume script: plain load_state_dict
    for i in range(3, 5):
        _step(model, opt, i)
    _assert_close(_params(model), ref)


def test_api_resumes_exactly_or_refuses(trained):
    name, path, ref, _ = trained
    sd = torch.load(path, weights_only=True)
    model, opt = _resume(name, sd)
    try:
        optckpt.load_optimizer_state_dict(opt, model, path)
    except optckpt.MappingError as e:
        pytest.skip(f"{name}: refused: {e}")
    for i in range(3, 5):
        _step(model, opt, i)
    _assert_close(_params(model), ref)


def test_global_state_entries_are_carried(trained):
    name, path, _, tmp = trained
    if name != "MADGRAD":
        pytest.skip("MADGRAD keeps a global step counter 'k' in its state")
    saved = torch.load(path, weights_only=True)["optimizer"]["state"]
    assert "k" in saved
    out = tmp / "reset.pt"
    spec_ok = invoke("reset", str(path), "--params", "fc1.*", "-o", str(out))
    assert spec_ok.exit_code == 0, spec_ok.output
    assert torch.equal(torch.load(out, weights_only=True)["optimizer"]["state"]["k"], saved["k"])
