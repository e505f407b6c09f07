"""DeepSpeed ZeRO checkpoints written by DeepSpeed itself (CPU accelerator, gloo, one process).

Ground truth: the same model trained the same way under stage 0, where DeepSpeed saves the plain
torch optimizer state dict; every stage's cut-back per-parameter state must equal it by name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import invoke, invoke_json, run_cli

from optckpt.io import load

pytest.importorskip("deepspeed", reason="DeepSpeed not installed")

_GEN = textwrap.dedent('''
    import os, sys
    import torch
    import deepspeed
    import deepspeed.comm.torch as ds_comm

    # the CPU accelerator JIT-compiles a shared-memory allreduce op at init (a C++ build, minutes,
    # a compiler needed); one process never uses it
    ds_comm.build_shm_op = lambda: None
    out = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        groups = [{"params": [model[0].weight, model[2].weight]},
                  {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
        cfg = {"train_batch_size": 2, "zero_optimization": {"stage": stage},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
        torch.manual_seed(1)
        for _ in range(3):
            loss = engine(torch.randn(2, 5)).pow(2).sum()
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(os.path.join(out, f"stage{stage}"))
''')

_MODEL = textwrap.dedent('''
    import torch

    def _with_optimizer(hidden):
        m = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
        groups = [{"params": [m[0].weight, m[2].weight]},
                  {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0}]
        return m, torch.optim.AdamW(groups, lr=1e-2)

    def build():
        return _with_optimizer(7)

    def wider():
        return _with_optimizer(9)
''')

NAMES = ["0.weight", "2.weight", "0.bias", "2.bias"]  # optimizer order: the param groups above


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def zero_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deepspeed")
    (root / "gen.py").write_text(_GEN)
    (root / "models.py").write_text(_MODEL)
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, str(root / "gen.py"), str(root)], capture_output=True, text=True,
                       env=env, timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def _truth(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[dict]]:
    """Stage 0: DeepSpeed saves the torch optimizer's own (index-keyed) state dict beside the module."""
    sd = torch.load(root / "stage0" / "global_step3" / "mp_rank_00_model_states.pt", weights_only=True)
    osd = sd["optimizer"]
    index = [i for g in osd["param_groups"] for i in g["params"]]
    state = {NAMES[index.index(i)]: v for i, v in osd["state"].items()}
    return sd["module"], state, osd["param_groups"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_state_cut_back_by_name_equals_stage0(zero_ckpts, stage):
    model, state, groups = _truth(zero_ckpts)
    ck = load(zero_ckpts / f"stage{stage}")
    assert ck.layout == "deepspeed" and ck.extras["zero_stage"] == stage
    opt = ck.optimizer()
    assert [g["params"] for g in opt.state_dict["param_groups"]] == [NAMES[:2], NAMES[2:]]
    assert [g["weight_decay"] for g in opt.state_dict["param_groups"]] == [g["weight_decay"] for g in groups]
    assert set(opt.state) == set(NAMES)
    for name in NAMES:
        for k in ("exp_avg", "exp_avg_sq"):
            got, want = opt.state[name][k], state[name][k]
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6, rtol=0), (name, k)
        assert float(opt.state[name]["step"]) == 3.0
        assert torch.allclose(ck.models[0].tensors[name], model[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_inspect_by_name_from_latest_and_step_dir(zero_ckpts, stage):
    for path in (zero_ckpts / f"stage{stage}", zero_ckpts / f"stage{stage}" / "global_step3"):
        code, rep = invoke_json("inspect", str(path))
        assert code == 0
        assert rep["layout"] == "deepspeed"
        opt = rep["optimizers"][0]
        assert opt["name_evidence"] == "fqn" and opt["ambiguous"] == 0
        assert [e["inferred_name"] for e in opt["entries"]] == NAMES
        assert {t["name"]: t["shape"] for t in rep["models"][0]["tensors"]} == \
            {"0.weight": [7, 5], "0.bias": [7], "2.weight": [3, 7], "2.bias": [3]}


def test_check_by_name(zero_ckpts):
    models = str(zero_ckpts / "models.py")
    for stage in (1, 2, 3):
        code, rep = invoke_json("check", str(zero_ckpts / f"stage{stage}"), "--target", f"{models}:build")
        assert code == 0, rep
        code, rep = invoke_json("check", str(zero_ckpts / f"stage{stage}"), "--target", f"{models}:wider")
        assert code == 1 and rep["counts"]["shape_mismatch"] == 3, rep


def test_diff_across_stages_by_name(zero_ckpts):
    for a, b in ((1, 2), (2, 3)):
        # the stage-3 run reduces in another order: float32 rounding (~1e-8), nothing more
        r = invoke("diff", str(zero_ckpts / f"stage{a}"), str(zero_ckpts / f"stage{b}"),
                   "--only", "model", "--only", "optimizer", "--atol", "1e-6")
        assert r.exit_code == 0, r.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_convert_to_torch_resumes_a_plain_optimizer(zero_ckpts, tmp_path, stage):
    """convert --to torch (a real subprocess): a name-keyed checkpoint; loaded into plain torch AdamW
    by name, one more step equals one more step from the stage-0 ground truth."""
    out = tmp_path / "converted.pt"
    r = run_cli("convert", str(zero_ckpts / f"stage{stage}"), "--to", "torch", "-o", str(out))
    assert r.returncode == 0, r.stderr
    got = torch.load(out, weights_only=True)
    assert list(got["optimizer"]["state"]) == NAMES

    def resumed(model_sd: dict, state: dict) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        m.load_state_dict(model_sd)
        params = dict(m.named_parameters())
        opt = torch.optim.AdamW([{"params": [params[n] for n in NAMES[:2]]},
                                 {"params": [params[n] for n in NAMES[2:]], "weight_decay": 0.0}], lr=1e-2)
        saved_groups = got["optimizer"]["param_groups"]
        opt.load_state_dict({"state": {i: state[n] for i, n in enumerate(NAMES)},
                             "param_groups": [{**g, "params": [NAMES.index(n) for n in g["params"]]}
                                              for g in saved_groups]})
        torch.manual_seed(2)
        m(torch.randn(2, 5)).pow(2).sum().backward()
        opt.step()
        return {n: p.detach().clone() for n, p in m.named_parameters()}

    model, state, _ = _truth(zero_ckpts)
    a = resumed(got["model"], got["optimizer"]["state"])
    b = resumed(model, {n: {k: v.clone() for k, v in s.items()} for n, s in state.items()})
    for n in NAMES:
        assert torch.allclose(a[n], b[n], atol=1e-6, rtol=0), n


def test_convert_to_dcp_is_name_keyed(zero_ckpts, tmp_path):
    out = tmp_path / "dcp"
    assert invoke("convert", str(zero_ckpts / "stage3"), "--to", "dcp", "-o", str(out)).exit_code == 0
    code, rep = invoke_json("inspect", str(out))
    assert code == 0 and rep["layout"] == "dcp"
    assert [e["inferred_name"] for e in rep["optimizers"][0]["entries"]] == NAMES


def test_edits_refused_with_one_line(zero_ckpts, tmp_path):
    r = run_cli("reset", str(zero_ckpts / "stage2"), "--params", "0.*", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.startswith("optckpt: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_latest_leaving_the_directory_is_refused(zero_ckpts, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "latest").write_text("../../etc")
    (d / "zero_to_fp32.py").write_text("")
    r = run_cli("inspect", str(d))
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr


def test_missing_rank_is_refused(zero_ckpts, tmp_path):
    import shutil

    d = tmp_path / "step"
    shutil.copytree(zero_ckpts / "stage2" / "global_step3", d)
    os.rename(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt", d / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    r = run_cli("inspect", str(d), "--format", "json")
    assert r.returncode == 2 and "expected 0..0" in r.stderr, r.stderr
    assert r.stdout == "" or json.loads(r.stdout) is None
