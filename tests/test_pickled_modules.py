"""Whole pickled ``nn.Module`` objects rewritten under ``--trust-pickle`` (issue #31 item 3): a torchvision
references-style ``{'model': <module>, 'optimizer': ..., 'args': Namespace}`` and a YOLO-shaped file
(``model`` / ``ema`` pickled in fp16, the EMA without gradients). The old code is pickled by reference
(``netcode.Net``), so the new code is the same import path with another definition: every load runs in a
subprocess from the directory that holds it, as a user's would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import invoke, run_cli

OLD = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 5)
            self.names = {0: "cat", 1: "dog"}

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))
''')

# the new code: the head registered first (optimizer order changes); "renamed" also calls conv "stem"
NEW = textwrap.dedent('''
    import torch
    from torch import nn

    STEM = {stem!r}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 5)
            setattr(self, STEM, nn.Conv2d(3, 4, 3, padding=1))
            self.bn = nn.BatchNorm2d(4)
            self.names = {{}}

        def forward(self, x):
            return self.head(torch.relu(self.bn(getattr(self, STEM)(x))).mean(dim=(2, 3)))

    def build():
        m = Net()
        return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
''')

COMMON = textwrap.dedent('''
    import sys
    import torch
    import netcode

    def data(i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)

    def step(m, opt, i):
        x, y = data(i)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
''')

TRAIN = COMMON + textwrap.dedent('''
    import argparse, copy
    torch.manual_seed(0)
    m = netcode.Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i in range(2):
        step(m, opt, i)
        sched.step()
    args = argparse.Namespace(lr=0.1, epochs=3, model="netcode")
    torch.save({"model": m, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "epoch": 1,
                "args": args}, "tv.pth")
    ema = copy.deepcopy(m).eval().half().requires_grad_(False)
    torch.save({"epoch": 1, "best_fitness": 0.5, "model": copy.deepcopy(m).half(), "ema": ema, "updates": 2,
                "optimizer": opt.state_dict(), "train_args": {"lr0": 0.1}, "date": "2026-12-05"}, "yolo.pt")
    step(m, opt, 2)  # the uninterrupted third step
    torch.save({n: p.detach().clone() for n, p in m.named_parameters()}, "ref.pt")
''')

RESUME = COMMON + textwrap.dedent('''
    # the new code resumes the torchvision-style file as it is: the module object and its optimizer
    ck = torch.load("tv_fixed.pth", weights_only=False)
    m = ck["model"]
    assert type(m) is netcode.Net and list(m.state_dict()) == list(netcode.Net().state_dict()), list(m.state_dict())
    assert m.names == {0: "cat", 1: "dog"}
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt.load_state_dict(ck["optimizer"])
    step(m, opt, 2)
    torch.save({n: p.detach().clone() for n, p in m.named_parameters()}, "got.pt")
    y = torch.load("yolo_fixed.pt", weights_only=False)
    out = {}
    for k in ("model", "ema"):
        assert type(y[k]) is netcode.Net and list(y[k].state_dict()) == list(netcode.Net().state_dict())
        out[k] = {"sd": y[k].state_dict(), "grad": [p.requires_grad for p in y[k].parameters()],
                  "training": y[k].training, "names": y[k].names}
    out["optimizer"] = y["optimizer"]
    torch.save(out, "yolo_loaded.pt")
''')


def _in_process(cwd: Path, script: str) -> None:
    """The same script run here (fast), ``netcode`` imported afresh from ``cwd`` and forgotten after."""
    import importlib

    old_cwd = os.getcwd()
    sys.path.insert(0, str(cwd))
    sys.modules.pop("netcode", None)
    importlib.invalidate_caches()
    try:
        os.chdir(cwd)
        exec(compile(script, str(cwd / "script.py"), "exec"), {"__name__": "__script__"})
    finally:
        os.chdir(old_cwd)
        sys.path.remove(str(cwd))
        sys.modules.pop("netcode", None)


def _py(cwd: Path, script: str) -> None:
    (cwd / "script.py").write_text(script)
    r = subprocess.run([sys.executable, "script.py"], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(cwd), PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pickled")
    (root / "netcode.py").write_text(OLD)
    _in_process(root, TRAIN)
    return root


@pytest.mark.parametrize("stem,real", [
    ("stem", False),
    pytest.param("stem", True, marks=pytest.mark.slow),
    pytest.param("conv", True, marks=pytest.mark.slow)], ids=["renamed-in-process", "renamed", "reordered"])
def test_remap_trust_pickle_rewrites_the_module_objects(trained, tmp_path, stem, real, monkeypatch):
    """The CLI and the resume as real subprocesses (slow), or in this process (the remap through click's
    runner, from the directory of the new code)."""
    for n in ("tv.pth", "yolo.pt", "ref.pt"):
        (tmp_path / n).write_bytes((trained / n).read_bytes())
    (tmp_path / "netcode.py").write_text(NEW.format(stem=stem))
    rename = ["--rename", "conv.=stem."] if stem == "stem" else []
    for name in ("tv", "yolo"):
        src = "tv.pth" if name == "tv" else "yolo.pt"
        args = ["remap", src, "--trust-pickle", "--target", "netcode:build", *rename, "-o",
                f"{name}_fixed{Path(src).suffix}"]
        if real:
            r = run_cli(*args, cwd=tmp_path)
            code, out = r.returncode, r.stdout + r.stderr
        else:
            with monkeypatch.context() as mp:
                mp.chdir(tmp_path)
                sys.modules.pop("netcode", None)
                try:
                    res = invoke(*args)
                finally:
                    sys.modules.pop("netcode", None)
            code, out = res.exit_code, res.stdout
        assert code == 0, out  # verified by state: no "differs from what was meant"
        assert "a pickled nn.Module object, rebuilt as the new code's Net" in out
    (_py if real else _in_process)(tmp_path, RESUME)

    def new_name(n: str) -> str:
        return n.replace("conv.", "stem.") if stem == "stem" else n

    ref, got = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "got.pt")
    assert set(got) == {new_name(n) for n in ref}
    for n in ref:  # one more step after the resume equals the uninterrupted run, by name
        torch.testing.assert_close(got[new_name(n)], ref[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")

    # the YOLO-shaped file: both modules in the new order, fp16 and flags kept, tensors bit for bit by name
    sys.path.insert(0, str(trained))  # the old code, to read the input file's modules
    try:
        sys.modules.pop("netcode", None)
        old = torch.load(trained / "yolo.pt", weights_only=False)
        old = {k: {n: t.clone() for n, t in old[k].state_dict().items()} for k in ("model", "ema")} | \
            {"optimizer": old["optimizer"]}
    finally:
        sys.path.remove(str(trained))
        sys.modules.pop("netcode", None)
    loaded = torch.load(tmp_path / "yolo_loaded.pt", weights_only=False)
    for k in ("model", "ema"):
        sd = loaded[k]["sd"]
        assert list(sd)[:2] == ["head.weight", "head.bias"] and loaded[k]["names"] == {0: "cat", 1: "dog"}
        assert {new_name(n) for n in old[k]} == set(sd)
        for n, t in old[k].items():
            assert sd[new_name(n)].dtype == t.dtype and torch.equal(sd[new_name(n)], t), (k, n)
    assert loaded["ema"]["grad"] == [False] * 6 and loaded["ema"]["training"] is False
    assert loaded["model"]["grad"] == [True] * 6
    new_names = loaded["optimizer"]["param_groups"][0]["param_names"]
    assert new_names == [n for n in loaded["model"]["sd"] if not n.startswith("bn.running")
                         and n != "bn.num_batches_tracked"]
    old_names = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"]
    for i, n in enumerate(new_names):
        j = [new_name(o) for o in old_names].index(n)
        assert torch.equal(loaded["optimizer"]["state"][i]["momentum_buffer"],
                           old["optimizer"]["state"][j]["momentum_buffer"]), n


@pytest.mark.slow
def test_trust_pickle_imports_from_the_current_directory_with_the_console_script(trained):
    """The ``optckpt`` console script (not ``python -m``, which puts the current directory first anyway)
    finds ``netcode`` from the current directory under --trust-pickle; elsewhere one clear line."""
    script = Path(sys.executable).parent / "optckpt"
    if not script.exists():
        pytest.skip("no optckpt console script installed beside this Python")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([str(script), "inspect", "tv.pth", "--trust-pickle"], cwd=trained, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(script), "inspect", str(trained / "tv.pth"), "--trust-pickle"], cwd=trained.parent,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2
    assert "optckpt: error:" in r.stderr and "need the module 'netcode'" in r.stderr
    assert "Traceback" not in r.stderr


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(6, 4)
        self.out = torch.nn.Linear(4, 6, bias=False)
        self.out.weight = self.emb.weight
        self.labels = ["a", "b"]


def test_rebuilt_module_keeps_ties_saved_dtype_and_flags():
    from optckpt.errors import WriteError
    from optckpt.pickled import rebuild_module

    torch.manual_seed(0)
    old = _Tied().half().requires_grad_(False).eval()
    template = _Tied()
    template.labels = []
    new = rebuild_module(old, template, old.state_dict(), "ckpt:model")
    assert new.out.weight is new.emb.weight and len(list(new.parameters())) == 1
    assert new.emb.weight.dtype == torch.float16 and torch.equal(new.emb.weight, old.emb.weight)
    assert not new.emb.weight.requires_grad and not new.training and new.labels == ["a", "b"]
    assert template.emb.weight.dtype == torch.float32 and template.labels == []  # the target is left alone
    with pytest.raises(WriteError, match="does not fit the new code's module"):
        rebuild_module(old, torch.nn.Linear(4, 6), old.state_dict(), "ckpt:model")
    with pytest.raises(WriteError, match="module:callable"):
        rebuild_module(old, None, old.state_dict(), "ckpt:model")
