"""mmengine's per-group scheduler lists (``base_values``, ``_last_value``) follow the param groups when
``remap`` reorders them (issue #31 item 5), as torch schedulers' ``base_lrs`` already did; and the rule
(a list with one plain number per group) never touches lists that are not per group."""

from __future__ import annotations

import shutil
from pathlib import Path

import models
import pytest
import torch
from conftest import invoke, run_cli

HERE = Path(__file__).resolve().parent

GROUPS_TARGET = '''
import torch
import models


def per_parameter_groups(model):
    """One group per parameter (mmengine's DefaultOptimWrapperConstructor with paramwise_cfg), the
    classifier at 10x lr."""
    return [{"params": [p], "lr": 1.0 if n.startswith("classifier") else 0.1} for n, p in model.named_parameters()]


def head_first():
    model = models.SmallCNNHeadFirst()
    return model, torch.optim.SGD(per_parameter_groups(model), lr=0.1, momentum=0.9, weight_decay=1e-4)


def two_groups(model):
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("classifier")]
    return head, rest


def sequential_head_first():
    model = models.SmallCNNHeadFirst()
    head, rest = two_groups(model)
    opt = torch.optim.SGD([{"params": head, "lr": 1.0}, {"params": rest, "lr": 0.1}], lr=0.1, momentum=0.9)
    return model, opt
'''


def _mmengine_shaped(path: Path) -> tuple[list[float], list[float]]:
    """A checkpoint shaped exactly as mmengine 0.10.7's Runner writes one for an OptimWrapper over several
    param groups (keys as a real Runner run printed them; without the message hub, whose HistoryBuffer
    objects need mmengine): the optimizer state dict carries ``base_param_settings``, and each
    ``param_schedulers`` entry's ``base_values`` / ``_last_value`` has one item per group plus a last one
    for those base settings. Real SGD state from two steps."""
    torch.manual_seed(0)
    model = models.SmallCNN()
    names = [n for n, _ in model.named_parameters()]
    base = [1.0 if n.startswith("classifier") else 0.1 for n in names]
    opt = torch.optim.SGD([{"params": [p], "lr": lr, "initial_lr": lr} for p, lr in zip(model.parameters(), base)],
                          lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    settings = {"params": torch.tensor([0.0]), **opt.defaults, "initial_lr": 0.1}
    last = [g["lr"] for g in opt.param_groups]
    common = {"param_name": "lr", "by_epoch": False, "base_values": base + [0.1], "_global_step": 2,
              "verbose": False, "_last_value": last + [0.1]}
    schedulers = [{"start_factor": 0.1, "end_factor": 1.0, "total_iters": 1, "begin": 0, "end": 2, "last_step": 1,
                   **common},
                  {"T_max": 4, "eta_min": 0.0, "eta_min_ratio": 0.1, "begin": 2, "end": 6, "last_step": 0, **common}]
    torch.save({"meta": {"epoch": 0, "iter": 2, "seed": 0, "mmengine_version": "0.10.7"},
                "state_dict": model.state_dict(),
                "optimizer": {**opt.state_dict(), "base_param_settings": settings},
                "param_schedulers": schedulers}, path)
    return base, names


def test_mmengine_shaped_lists_follow_the_new_group_order(tmp_path, monkeypatch):
    base, names = _mmengine_shaped(tmp_path / "iter_2.pth")
    (tmp_path / "groups_target.py").write_text(GROUPS_TARGET)
    monkeypatch.chdir(tmp_path)
    r = invoke("remap", "iter_2.pth", "--target", "groups_target:head_first", "-o", "fixed.pth")
    assert r.exit_code == 0, r.stdout + r.stderr
    old = torch.load(tmp_path / "iter_2.pth", weights_only=True)
    new = torch.load(tmp_path / "fixed.pth", weights_only=True)
    order = [n for n, _ in models.SmallCNNHeadFirst().named_parameters()]
    assert [g["param_names"] for g in new["optimizer"]["param_groups"]] == [[n] for n in order]
    want = [base[names.index(n)] for n in order]
    assert want[:2] == [1.0, 1.0] and want != base  # the classifier's groups come first now
    for s_old, s_new in zip(old["param_schedulers"], new["param_schedulers"]):
        assert s_new["base_values"] == want + [0.1]  # the base settings' entry stays last
        assert s_new["_last_value"] == [s_old["_last_value"][names.index(n)] for n in order] + [0.1]
        assert {k: v for k, v in s_new.items() if k not in ("base_values", "_last_value")} == \
            {k: v for k, v in s_old.items() if k not in ("base_values", "_last_value")}
    assert [g["lr"] for g in new["optimizer"]["param_groups"]] == \
        [s for s in new["param_schedulers"][1]["_last_value"][:-1]]
    assert torch.equal(new["optimizer"]["base_param_settings"]["params"], torch.tensor([0.0]))
    assert new["optimizer"]["base_param_settings"]["lr"] == 0.1


def test_lists_that_are_not_per_group_are_left_alone(tmp_path, monkeypatch):
    """torch's SequentialLR over three schedulers on two groups: its ``_milestones`` has two plain
    numbers, as many as there are groups, and is not per group; the children's ``base_lrs`` are."""
    torch.manual_seed(0)
    model = models.SmallCNN()
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("classifier")]
    opt = torch.optim.SGD([{"params": rest, "lr": 0.1}, {"params": head, "lr": 1.0}], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2),
        torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
        torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)], milestones=[2, 4])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
               tmp_path / "ckpt.pt")
    (tmp_path / "groups_target.py").write_text(GROUPS_TARGET)
    monkeypatch.chdir(tmp_path)
    r = invoke("remap", "ckpt.pt", "--target", "groups_target:sequential_head_first", "-o", "fixed.pt")
    assert r.exit_code == 0, r.stdout + r.stderr
    old = torch.load(tmp_path / "ckpt.pt", weights_only=True)["scheduler"]
    new = torch.load(tmp_path / "fixed.pt", weights_only=True)["scheduler"]
    assert new["_milestones"] == old["_milestones"] == [2, 4]
    assert new["_last_lr"] == old["_last_lr"][::-1]
    for c_old, c_new in zip(old["_schedulers"], new["_schedulers"]):
        assert c_new["base_lrs"] == c_old["base_lrs"][::-1] == [1.0, 0.1]


@pytest.mark.slow
def test_mmengine_runner_resumes_a_head_first_target_with_the_right_group_lrs(tmp_path, monkeypatch):
    """A real mmengine Runner: 4 iterations uninterrupted; the same run saved at iteration 2, remapped for
    the head-first model (a real subprocess run of the CLI) and resumed by the Runner's own resume to
    iteration 4 gives every group the uninterrupted run's lr and every parameter its value. The cosine
    floor is a ratio of each group's base value, so base_values in the old group order give the classifier
    groups a conv group's lr."""
    pytest.importorskip("mmengine.runner")  # mmengine is not a test extra: its Runner needs OpenCV
    import mm_runner_target as code

    # mmengine 0.10 loads its own checkpoints (which pickle its HistoryBuffer) with torch.load's default
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    a = code.run(code.Net(), tmp_path / "a", 4)

    def by_name(runner):
        names = {id(p): n for n, p in runner.model.named_parameters()}
        lrs = {names[id(g["params"][0])]: g["lr"] for g in runner.optim_wrapper.param_groups[:-1]}
        return lrs, {n: p.detach().clone() for n, p in runner.model.named_parameters()}

    ref_lrs, ref = by_name(a)
    ckpt = tmp_path / "a" / "iter_2.pth"
    shutil.copy(HERE / "mm_runner_target.py", tmp_path / "mm_runner_target.py")
    r = run_cli("remap", str(ckpt), "--target", "mm_runner_target:head_first", "-o", str(tmp_path / "fixed.pth"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    torch.manual_seed(0)
    b = code.run(code.NetHeadFirst(), tmp_path / "b", 4, resume=tmp_path / "fixed.pth")
    lrs, got = by_name(b)
    assert lrs == ref_lrs and len(set(lrs.values())) > 1
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    assert [s.base_values[:2] for s in b.param_schedulers] == [[1.0, 1.0]] * 2  # classifier groups first
