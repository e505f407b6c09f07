"""A DeepSpeed stage-0 save directory (``latest`` + ``global_stepN/mp_rank_00_model_states.pt``, which holds
the plain torch optimizer state dict) given at its top, as DeepSpeed's ``load_checkpoint`` is given it: read,
checked and repaired in place of its step directory, ``latest`` carried (issue #31 item 2, stage 0)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, invoke, invoke_json, run_cli

from optckpt.io import load

STEP = "global_step3/mp_rank_00_model_states.pt"
NAMES = ["0.weight", "2.weight", "0.bias", "2.bias"]  # the saved optimizer order (tests/test_deepspeed.py)

MODELS = textwrap.dedent('''
    import torch

    def _net():
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))

    def groups(m, order):
        return [{"params": [m[i].weight for i in order]},
                {"params": [m[i].bias for i in order], "weight_decay": 0.0}]

    def build():
        m = _net()
        return m, torch.optim.AdamW(groups(m, (0, 2)), lr=1e-2)

    def reordered():  # the same parameters handed to the optimizer in another order
        m = _net()
        return m, torch.optim.AdamW(groups(m, (2, 0)), lr=1e-2)
''')


@pytest.fixture
def stage0(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES / "zero_ckpts" / "stage0", tmp_path / "stage0")
    (tmp_path / "models.py").write_text(MODELS)
    return tmp_path / "stage0"


def test_the_top_directory_reads_as_its_step_directory(stage0):
    ck = load(stage0)
    top = {p.relpath for p in ck.parts}
    assert top == {"latest", STEP}
    step = load(stage0 / "global_step3")
    assert [m.name for m in ck.models] == [f"{STEP}:module"]
    assert ck.optimizer().state_dict["param_groups"] == step.optimizer().state_dict["param_groups"]
    code, rep = invoke_json("inspect", str(stage0))
    assert code == 0 and [e["inferred_name"] for e in rep["optimizers"][0]["entries"]] == NAMES


def test_check_and_remap_at_the_top_keep_deepspeeds_layout(stage0):
    """Unchanged code SAFE, a reordered optimizer NOT SAFE; remap -o writes the
    same layout (``latest`` and the step directory) with the state moved by name, and --in-place too."""
    models = str(stage0.parent / "models.py")
    r = invoke("check", str(stage0), "--target", f"{models}:build")
    assert r.exit_code == 0, r.stdout + r.stderr
    r = invoke("check", str(stage0), "--target", f"{models}:reordered")
    assert r.exit_code == 1, r.stdout + r.stderr
    out = stage0.parent / "fixed"
    r = invoke("remap", str(stage0), "--target", f"{models}:reordered", "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    assert sorted(os.listdir(out)) == ["global_step3", "latest"] and os.listdir(out / "global_step3") == \
        ["mp_rank_00_model_states.pt"]
    assert (out / "latest").read_bytes() == (stage0 / "latest").read_bytes()
    old = torch.load(stage0 / STEP, weights_only=True)
    new = torch.load(out / STEP, weights_only=True)
    assert [g["param_names"] for g in new["optimizer"]["param_groups"]] == [["2.weight", "0.weight"],
                                                                           ["2.bias", "0.bias"]]
    moved = {0: 1, 1: 0, 2: 3, 3: 2}  # new index -> old index
    for i, j in moved.items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new["optimizer"]["state"][i][k], old["optimizer"]["state"][j][k])
    for k in old["module"]:
        assert torch.equal(new["module"][k], old["module"][k])
    assert {k for k in new if k != "optimizer"} == {k for k in old if k != "optimizer"}
    r = invoke("check", str(out), "--target", f"{models}:reordered")
    assert r.exit_code == 0, r.stdout + r.stderr
    r = invoke("remap", str(stage0), "--target", f"{models}:reordered", "--in-place")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert torch.load(stage0 / STEP, weights_only=True)["optimizer"]["param_groups"] == \
        new["optimizer"]["param_groups"]


_DS = textwrap.dedent('''
    import sys
    import torch
    import deepspeed
    import deepspeed.comm.torch as ds_comm
    import models

    ds_comm.build_shm_op = lambda: None  # one process never uses the shared-memory allreduce (a C++ build)
    mode, ckpt, out = sys.argv[1:]
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model, _ = models.build()
    order = (0, 2) if mode == "train" else (2, 0)
    cfg = {"train_batch_size": 2, "zero_optimization": {"stage": 0},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=models.groups(model, order), config=cfg)
    torch.manual_seed(1)
    batches = [torch.randn(2, 5) for _ in range(4)]

    def step(x):
        engine.backward(engine(x).pow(2).sum())
        engine.step()

    if mode == "train":
        for x in batches[:3]:
            step(x)
        engine.save_checkpoint(ckpt)
    else:
        engine.load_checkpoint(ckpt)  # the unchanged resume script: the top directory, latest followed
    step(batches[3])
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out)
''')


@pytest.mark.slow
def test_deepspeed_resumes_the_repaired_top_directory_exactly(tmp_path):
    """DeepSpeed stage 0 (CPU, gloo, one process): train 3 steps, save, one more step is the reference;
    the optimizer's parameter order changes, ``remap DIR --in-place`` at the top (a real subprocess run),
    and DeepSpeed's own ``load_checkpoint`` of the directory then gives the same 4th step by name;
    unrepaired, it does not."""
    pytest.importorskip("deepspeed")
    from test_deepspeed import _free_port

    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "ds.py").write_text(_DS)

    def ds(*args: str) -> None:
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", PYTHONWARNINGS="ignore")
        r = subprocess.run([sys.executable, "ds.py", *args], capture_output=True, text=True, env=env, timeout=600,
                           cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]

    ds("train", "ckpt", "ref.pt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "unrepaired")
    r = run_cli("remap", "ckpt", "--target", "models.py:reordered", "--in-place", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ds("resume", "ckpt", "got.pt")
    ref, got = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "got.pt")
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    try:
        ds("resume", "unrepaired", "bad.pt")
    except AssertionError:
        return  # DeepSpeed refused or crashed on the unrepaired state
    bad = torch.load(tmp_path / "bad.pt")
    assert any(not torch.allclose(bad[n], ref[n], atol=1e-6) for n in ref)


def test_set_at_the_top_edits_the_step_directory(stage0):
    r = invoke("set", str(stage0), "--scale-lr", "0.5", "--in-place")
    assert r.exit_code == 0, r.stdout + r.stderr
    sd = torch.load(stage0 / STEP, weights_only=True)
    assert [g["lr"] for g in sd["optimizer"]["param_groups"]] == [0.005, 0.005]
    assert sorted(os.listdir(stage0)) == ["global_step3", "latest"]
