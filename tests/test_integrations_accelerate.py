"""accelerate: train, ``save_state``, change the model (reorder + a new layer), resume with
``load_state`` plus one line, and match the uninterrupted run by name."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

import real_models  # noqa: E402  (fixtures/, on sys.path via conftest)
from accelerate.state import AcceleratorState, GradientState, PartialState  # noqa: E402

from optckpt import MappingError  # noqa: E402
from optckpt.integrations.accelerate import load_optimizers_by_name  # noqa: E402


class Net(nn.Module):
    """TinyNet; ``changed``: registered head first, plus an auxiliary head on detached features."""

    def __init__(self, changed: bool = False):
        super().__init__()
        self.changed = changed
        self.net = real_models.build_tinynet_reordered() if changed else real_models.build_tinynet()
        if changed:
            self.aux = nn.Linear(8, 4)

    def loss(self, x, y):
        h = self.net.body(self.net.embed(x)).mean(dim=1)
        out = nn.functional.cross_entropy(self.net.head(h), y)
        if self.changed:
            out = out + nn.functional.cross_entropy(self.aux(h.detach()), y)
        return out


def _optimizers(model: Net):
    """Two optimizers over one model, in registration order: the trunk, and the head(s) with their
    own schedule."""
    is_head = [n.startswith(("net.head.", "aux.")) for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    trunk = torch.optim.AdamW([p for p, h in zip(params, is_head) if not h], lr=1e-2)
    heads = torch.optim.Adam([p for p, h in zip(params, is_head) if h], lr=2e-2)
    return trunk, heads, torch.optim.lr_scheduler.StepLR(heads, step_size=2, gamma=0.5)


def _accelerator():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return accelerate.Accelerator(cpu=True)


def _run(model, steps, *, save_at=None, save_dir=None, resume=None, by_name=None, **save_kwargs):
    """Train ``steps`` steps (from ``resume``, a save_state directory, when given); ``by_name``
    (kwargs) adds the integration's one line."""
    acc = _accelerator()
    hooks = load_optimizers_by_name(acc, **by_name) if by_name is not None else None
    trunk, heads, sched = _optimizers(model)
    x, y = real_models.synthetic_tinynet_data()
    model, trunk, heads, sched = acc.prepare(model, trunk, heads, sched)
    start = 0
    if resume is not None:
        acc.load_state(str(resume), strict=False)  # strict=False: the new layer has no saved weights
        start = save_at
    for step in range(start, steps):
        xb, yb = x[4 * (step % 4):4 * (step % 4) + 4], y[4 * (step % 4):4 * (step % 4) + 4]
        acc.backward(acc.unwrap_model(model).loss(xb, yb))
        trunk.step()
        heads.step()
        sched.step()
        trunk.zero_grad()
        heads.zero_grad()
        if step + 1 == save_at and save_dir is not None:
            acc.save_state(str(save_dir), **save_kwargs)
    params = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()}
    return params, hooks


def _assert_same_by_name(got, ref):
    assert set(ref) <= set(got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


@pytest.fixture
def plain_state(tmp_path):
    """A save_state directory written without the integration (no param_names), and the run it
    interrupted, carried on uninterrupted to step 4."""
    ref, _ = _run(Net(), 4, save_at=2, save_dir=tmp_path / "state")
    return tmp_path / "state", ref


def test_resume_changed_model_by_name_matches_uninterrupted(plain_state, caplog):
    state, ref = plain_state
    assert all("param_names" not in g for g in torch.load(state / "optimizer.bin", weights_only=True)["param_groups"])
    with caplog.at_level(logging.INFO, logger="accelerate.optckpt"):
        got, hooks = _run(Net(changed=True), 4, save_at=2, resume=state, by_name={"old_model": Net()})
    _assert_same_by_name(got, ref)
    assert hooks is not None and len(hooks) == 2
    trunk, heads = (h.report for h in hooks)
    assert trunk is not None and heads is not None
    assert trunk.clean and trunk.moved  # the trunk's parameters sit at other indices in the new order
    assert heads.missing == ["aux.weight", "aux.bias"] and not heads.unexpected
    ours = [r for r in caplog.records if r.name == "accelerate.optckpt"]
    assert [r.levelno for r in ours] == [logging.INFO, logging.WARNING]
    assert "missing ['aux.weight', 'aux.bias']" in ours[1].getMessage()


def test_without_the_integration_the_same_resume_crashes_or_diverges(plain_state):
    state, ref = plain_state
    try:
        got, _ = _run(Net(changed=True), 4, save_at=2, resume=state)
    except (ValueError, RuntimeError):
        return
    assert any(not torch.allclose(got[n], ref[n], atol=1e-6) for n in ref)


def test_without_order_evidence_it_refuses_unless_allowed(plain_state):
    """model.safetensors is sorted by name: without old_model the saved order is unknown, and
    TinyNet's same-shape parameters cannot be told apart."""
    state, _ = plain_state
    with pytest.raises(MappingError, match="old_model="):
        _run(Net(changed=True), 4, save_at=2, resume=state, by_name={})
    _, hooks = _run(Net(changed=True), 4, save_at=2, resume=state, by_name={"allow_ambiguous": True})
    assert hooks is not None and hooks[0].report is not None and hooks[0].report.ambiguous


def test_state_saved_through_the_integration_resumes_exactly_by_saved_names(tmp_path):
    ref, _ = _run(Net(), 4, save_at=2, save_dir=tmp_path / "state", by_name={})
    for name in ("optimizer.bin", "optimizer_1.bin"):
        groups = torch.load(tmp_path / "state" / name, weights_only=True)["param_groups"]
        assert all(g["param_names"] for g in groups)
    got, hooks = _run(Net(changed=True), 4, save_at=2, resume=tmp_path / "state", by_name={})
    _assert_same_by_name(got, ref)
    assert hooks is not None and all(h.report is not None and h.report.evidence == "param_names" for h in hooks)


def test_a_pickled_model_file_gives_the_order_without_old_model(tmp_path):
    """save_state(safe_serialization=False) writes pytorch_model.bin, in registration order."""
    ref, _ = _run(Net(), 4, save_at=2, save_dir=tmp_path / "state", safe_serialization=False)
    assert (tmp_path / "state" / "pytorch_model.bin").exists()
    got, hooks = _run(Net(changed=True), 4, save_at=2, resume=tmp_path / "state", by_name={})
    _assert_same_by_name(got, ref)
    assert hooks is not None and all(h.report is not None and h.report.evidence == "model-order" for h in hooks)
