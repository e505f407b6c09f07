"""``remap`` / ``set`` / ``reset`` on DeepSpeed ZeRO directories, written back in DeepSpeed's own layout.

Fast tests edit the committed ZeRO fixtures (written by DeepSpeed 0.19.8, see test_deepspeed.py) and
read the files back raw: flat partitions in the new order, ``param_shapes``, the lr in the base
optimizer's param groups. The slow tests are the ground truth with DeepSpeed itself (CPU accelerator,
gloo; one process, and two data-parallel ranks as two processes): train, ``engine.save_checkpoint``,
change the model code (modules reordered, one renamed), ``optckpt remap DIR --target ... --in-place``,
resume with the unchanged script's ``engine.load_checkpoint``, and one more step equals the
uninterrupted run by name; the unrepaired checkpoint resumes wrong without any error."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, run_cli

from optckpt.io import load
from optckpt.io.safepickle import PickledObject

_TARGETS = textwrap.dedent('''
    import torch

    def _net():
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))

    def reordered():  # the same parameters handed to the optimizer in another order
        m = _net()
        groups = [{"params": [m[2].weight, m[0].weight]},
                  {"params": [m[2].bias, m[0].bias], "weight_decay": 0.0}]
        return m, torch.optim.AdamW(groups, lr=1e-2)

    class Named(torch.nn.Module):  # modules renamed: 0 -> enc, 2 -> head, head handed over first
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(7, 3)
            self.enc = torch.nn.Linear(5, 7)

    def renamed():
        m = Named()
        groups = [{"params": [m.head.weight, m.enc.weight]},
                  {"params": [m.head.bias, m.enc.bias], "weight_decay": 0.0}]
        return m, torch.optim.AdamW(groups, lr=1e-2)
''')

NAMES = ["0.weight", "2.weight", "0.bias", "2.bias"]
SHAPES = {"0.weight": (7, 5), "2.weight": (3, 7), "0.bias": (7,), "2.bias": (3,)}


@pytest.fixture()
def zero(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES / "zero_ckpts", tmp_path, dirs_exist_ok=True)
    (tmp_path / "targets.py").write_text(_TARGETS)
    return tmp_path


def _raw(step: Path) -> tuple[dict, list[dict]]:
    """The model states dict and each rank's optimizer_state_dict, as the files hold them."""
    ck = load(step)
    models = [p.obj for p in ck.parts if "model_states" in p.relpath]
    optims = sorted((p for p in ck.parts if "optim_states" in p.relpath), key=lambda p: p.relpath)
    return models[0], [p.obj["optimizer_state_dict"] for p in optims]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _by_name(ck) -> dict[str, dict[str, torch.Tensor]]:
    return {n: dict(s) for n, s in ck.optimizer().state.items()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_remap_in_place_rebuilds_the_flat_partitions(zero, stage):
    d = zero / f"stage{stage}"
    before = load(d)
    old_state = _by_name(before)
    old_tree = _tree(d / "global_step3")
    r = run_cli("remap", str(d), "--target", f"{zero / 'targets.py'}:reordered", "--in-place", cwd=zero)
    assert r.returncode == 0, r.stderr
    # a new step directory; latest switched to it; the old one kept as it was
    assert (d / "latest").read_text() == "global_step3_optckpt"
    assert _tree(d / "global_step3") == old_tree
    new_step = d / "global_step3_optckpt"
    model_sd, zeros = _raw(new_step)
    new_order = [["2.weight", "0.weight"], ["2.bias", "0.bias"]]
    assert [list(g) for g in model_sd["param_shapes"]] == new_order
    assert [[tuple(s) for s in g.values()] for g in model_sd["param_shapes"]] == \
        [[SHAPES[n] for n in g] for g in new_order]
    flat_key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    ck = load(d)
    masters = ck.models[0].tensors if stage == 3 else {n: v for n, v in ck.models[0].tensors.items()}
    for g, names in enumerate(new_order):
        flat = zeros[0][flat_key][g]
        want = torch.cat([masters[n].reshape(-1) for n in names])
        assert torch.equal(flat[:want.numel()], want)  # position k holds the k-th parameter of the new order
        base = zeros[0]["optimizer_state_dict" if stage == 3 else "base_optimizer_state"]
        exp_avg = base["state"][g]["exp_avg"]
        assert torch.equal(exp_avg[:want.numel()], torch.cat([old_state[n]["exp_avg"].reshape(-1) for n in names]))
    # DeepSpeed's pickled objects travel as read: still placeholders of the same classes
    scaler = zeros[0]["loss_scaler"]
    assert isinstance(scaler, PickledObject) and scaler.type_name.endswith("LossScaler")
    if stage != 3:
        frags = zeros[0]["param_slice_mappings"]
        assert [list(g) for g in frags] == [["2.weight", "0.weight"], ["2.bias", "0.bias"]]
        assert [(f.state["numel"], f.state["start"]) for f in frags[0].values()] == [(21, 0), (35, 21)]
    # by name nothing changed; the new code is now safe to resume plainly (by position)
    assert _by_name(ck).keys() == old_state.keys()
    for n, s in _by_name(ck).items():
        for k, v in s.items():
            assert torch.equal(v, old_state[n][k]), (n, k)
    r = run_cli("check", str(d), "--target", f"{zero / 'targets.py'}:reordered", cwd=zero)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_remap_renames_the_module_keys(zero, tmp_path, stage):
    d = zero / f"stage{stage}"
    out = tmp_path / "out"
    r = run_cli("remap", str(d), "--target", f"{zero / 'targets.py'}:renamed", "--rename", "0.=enc.",
                "--rename", "2.=head.", "-o", str(out), cwd=zero)
    assert r.returncode == 0, r.stderr
    assert (out / "latest").read_text() == "global_step3" and (d / "latest").read_text() == "global_step3"
    model_sd, zeros = _raw(out / "global_step3")
    assert set(model_sd["module"]) == {"enc.weight", "enc.bias", "head.weight", "head.bias"}
    assert [list(g) for g in model_sd["param_shapes"]] == [["head.weight", "enc.weight"], ["head.bias", "enc.bias"]]
    if stage == 3:  # partitioned parameters: empty placeholders in the module, as DeepSpeed writes them
        assert all(v.numel() == 0 for v in model_sd["module"].values())
    old, new = _by_name(load(d)), _by_name(load(out))
    for n in NAMES:
        m = n.replace("0.", "enc.").replace("2.", "head.")
        assert all(torch.equal(new[m][k], v) for k, v in old[n].items()), n
    assert run_cli("check", str(out), "--target", f"{zero / 'targets.py'}:renamed", cwd=zero).returncode == 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_set_scale_lr_halves_the_lr_deepspeed_restores(zero, tmp_path, stage):
    d = zero / f"stage{stage}"
    old_tree = _tree(d)
    out = tmp_path / "half"
    r = run_cli("set", str(d), "--scale-lr", "0.5", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert _tree(d) == old_tree  # the input untouched
    _, zeros = _raw(out / "global_step3")
    base = zeros[0]["optimizer_state_dict" if stage == 3 else "base_optimizer_state"]
    assert [g["lr"] for g in base["param_groups"]] == [0.005, 0.005]  # what torch's load_state_dict restores
    assert [g["weight_decay"] for g in base["param_groups"]] == [0.01, 0.0]
    old, new = _by_name(load(d)), _by_name(load(out))
    assert all(torch.equal(new[n][k], v) for n in NAMES for k, v in old[n].items())


def test_reset_gives_fresh_moments_and_keeps_the_group_step(zero, tmp_path):
    d = zero / "stage2"
    out = tmp_path / "reset"
    r = run_cli("reset", str(d), "--params", "0.*", "-o", str(out))
    assert r.returncode == 0, r.stderr
    old, new = _by_name(load(d)), _by_name(load(out))
    for n in NAMES:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new[n][k], torch.zeros(SHAPES[n]) if n.startswith("0.") else old[n][k]), (n, k)
        assert float(new[n]["step"]) == 3.0  # one step per flat group: DeepSpeed has no per-parameter step
    # --mode zero asks for step 0 on some parameters of a group only: not representable, refused
    r = run_cli("reset", str(d), "--params", "0.*", "--mode", "zero", "-o", str(tmp_path / "zero"))
    assert r.returncode == 2 and r.stderr.startswith("optckpt: error:") and "step" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "zero").exists()


def test_set_lr_refused_under_a_deepspeed_scheduler(zero, tmp_path):
    """DeepSpeed's own schedulers save only their position and set the lr from the config each step."""
    d = zero / "stage2"
    model = d / "global_step3" / "mp_rank_00_model_states.pt"
    sd = torch.load(model, weights_only=True)
    sd["lr_scheduler"] = {"last_batch_iteration": 2}
    torch.save(sd, model)
    r = run_cli("set", str(d), "--lr", "0.001", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "scheduler" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()


def test_set_scale_lr_follows_a_torch_scheduler_and_a_second_edit_gets_its_own_step(zero):
    """A client torch scheduler (deepspeed.initialize(lr_scheduler=...)) is saved in the model states
    file and loaded before the optimizer: its base_lrs follow the lr, as for plain torch files."""
    d = zero / "stage3"
    model = d / "global_step3" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    sd = torch.load(model, weights_only=True)
    opt = torch.optim.AdamW([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    for _ in range(3):
        opt.step()
        sched.step()
    sd["lr_scheduler"] = sched.state_dict()
    torch.save(sd, model)
    r = run_cli("set", str(d), "--scale-lr", "0.5", "--in-place")
    assert r.returncode == 0, r.stderr
    r = run_cli("set", str(d), "--scale-lr", "0.5", "--in-place")
    assert r.returncode == 0, r.stderr
    assert (d / "latest").read_text() == "global_step3_optckpt2"
    assert all((d / t).is_dir() for t in ("global_step3", "global_step3_optckpt"))
    new = torch.load(d / "global_step3_optckpt2" / model.name, weights_only=True)["lr_scheduler"]
    assert new["base_lrs"] == [0.0025, 0.0025] and new["last_epoch"] == 3
    assert [g["lr"] for g in load(d).optimizer().state_dict["param_groups"]] == [0.0025, 0.0025]


def test_step_directory_in_place_without_latest_is_swapped_whole(zero, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(zero / "stage1" / "global_step3", step)
    r = run_cli("set", str(step), "--lr", "0.002", "--in-place")
    assert r.returncode == 0, r.stderr
    assert [g["lr"] for g in load(step).optimizer().state_dict["param_groups"]] == [0.002, 0.002]
    assert [g["lr"] for g in load(tmp_path / "step.bak").optimizer().state_dict["param_groups"]] == [0.01, 0.01]


# ---------------------------------------------------------------------------------------------
# ground truth with DeepSpeed itself

_MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(5, 7)
            self.mid = nn.Linear(7, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.relu(self.mid(torch.relu(self.enc(x)))))

    class New(nn.Module):  # modules defined in another order, one renamed: enc -> encoder
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 3)
            self.encoder = nn.Linear(5, 7)
            self.mid = nn.Linear(7, 6)

        def forward(self, x):
            return self.head(torch.relu(self.mid(torch.relu(self.encoder(x)))))

    class Reordered(nn.Module):  # the old names, modules defined in another order
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 3)
            self.enc = nn.Linear(5, 7)
            self.mid = nn.Linear(7, 6)

        def forward(self, x):
            return self.head(torch.relu(self.mid(torch.relu(self.enc(x)))))

    def groups(m):
        named = list(m.named_parameters())
        return [{"params": [p for n, p in named if n.endswith("weight")]},
                {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]

    def target():
        m = New()
        return m, torch.optim.AdamW(groups(m), lr=1e-2)
''')

# The unchanged training script: `full` trains 3 steps, saves, (`half`: halves the lr) and takes
# step 4; `resume` builds the new model, engine.load_checkpoint, and takes the same step 4.
_TRAIN = textwrap.dedent('''
    import json, os, sys
    import torch
    import deepspeed
    import deepspeed.comm.torch as ds_comm

    ds_comm.build_shm_op = lambda: None  # a JIT C++ build of a shared-memory op at init, unused here
    mode, stage, ckdir, outfile, bf16 = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
    extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import models

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model = {"resume": models.New, "resume_reordered": models.Reordered}.get(mode, models.Old)()
    cfg = {"train_batch_size": 2 * world, "zero_optimization": {"stage": stage, **extra},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=models.groups(model), config=cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def step(i):
        g = torch.Generator().manual_seed(100 + 10 * i + rank)
        loss = engine(torch.randn(2, 5, generator=g).to(dtype)).float().pow(2).sum()
        engine.backward(loss)
        engine.step()

    if mode.startswith("resume"):
        assert engine.load_checkpoint(ckdir)[0] is not None
    else:
        for i in range(3):
            step(i)
        engine.save_checkpoint(ckdir)
        if mode == "half":
            for g in engine.optimizer.param_groups:
                g["lr"] *= 0.5
    lrs = [g["lr"] for g in engine.optimizer.param_groups]
    step(3)
    from deepspeed.utils import safe_get_full_fp32_param
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    got = {}
    for n, p in engine.module.named_parameters():
        with GatheredParameters([p], enabled=stage == 3):
            got[n] = {"master": safe_get_full_fp32_param(p).clone(), "param": p.detach().float().clone()}
    if rank == 0:
        torch.save({"params": got, "lrs": lrs}, outfile)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deepspeed(root: Path, world: int, *args: str) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world), PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, str(root / "train.py"), *args], cwd=root, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def _project(root: Path) -> None:
    (root / "models.py").write_text(_MODELS)
    (root / "train.py").write_text(_TRAIN)


def _max_diff(a: Path, b: Path, rename=lambda n: n, keys=("master", "param")) -> tuple[float, list[float], list[float]]:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert {rename(n) for n in x["params"]} == set(y["params"])
    worst = max(float((v[k].float() - y["params"][rename(n)][k].float()).abs().max())
                for n, v in x["params"].items() for k in keys)
    return worst, x["lrs"], y["lrs"]


def _new_name(n: str) -> str:
    return n.replace("enc.", "encoder.")


CASES = [(1, 1, False), (2, 1, False), (3, 1, False), (1, 2, False), (2, 2, False), (3, 2, False),
         (1, 1, True), (2, 1, True), (3, 1, True), (1, 2, True)]


@pytest.mark.slow
@pytest.mark.parametrize("stage,world,bf16", CASES, ids=[f"zero{s}-world{w}{'-bf16' if b else ''}"
                                                         for s, w, b in CASES])
def test_deepspeed_resumes_the_repaired_checkpoint_exactly(tmp_path, stage, world, bf16):
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed")
    _project(tmp_path)
    ck, flag = tmp_path / "ckpt", "1" if bf16 else "0"
    _deepspeed(tmp_path, world, "full", str(stage), str(ck), str(tmp_path / "truth.pt"), flag)
    prefix = "bf16_" if bf16 else ""
    assert (ck / "global_step3" / f"{prefix}zero_pp_rank_{world - 1}_mp_rank_00_optim_states.pt").is_file()
    if (stage, world, bf16) == (3, 1, False):  # the control: DeepSpeed resumes the unrepaired copy wrong, silently
        shutil.copytree(ck, tmp_path / "unrepaired")
        _deepspeed(tmp_path, world, "resume_reordered", str(stage), str(tmp_path / "unrepaired"),
                   str(tmp_path / "bad.pt"), flag)
        assert _max_diff(tmp_path / "truth.pt", tmp_path / "bad.pt")[0] > 1e-3
    r = run_cli("check", str(ck), "--target", "models.py:target", "--rename", "enc.=encoder.", cwd=tmp_path)
    assert r.returncode == 1, r.stdout  # not safe as it is
    r = run_cli("remap", str(ck), "--target", "models.py:target", "--rename", "enc.=encoder.", "--in-place",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (ck / "latest").read_text() == "global_step3_optckpt" and (ck / "global_step3").is_dir()
    _deepspeed(tmp_path, world, "resume", str(stage), str(ck), str(tmp_path / "got.pt"), flag)
    worst, want_lr, got_lr = _max_diff(tmp_path / "truth.pt", tmp_path / "got.pt", _new_name)
    assert worst <= 1e-6, worst
    assert want_lr == got_lr


@pytest.mark.slow
def test_deepspeed_round_robin_and_parameter_alignment(tmp_path):
    """Two ranks with round_robin_gradients (the flat order interleaves the parameters across ranks) and
    parameter_alignment (padding between parameters). Under round robin DeepSpeed's own fp32 read-out
    (safe_get_full_fp32_param) links fragments by offsets in the unshuffled order, so it reads other
    parameters' ranges; the parameters themselves, after the step that used the masters and the
    state, are the ground truth."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed")
    _project(tmp_path)
    for stage, extra, keys in ((2, '{"round_robin_gradients": true}', ("param",)),
                               (1, '{"parameter_alignment": true}', ("master", "param"))):
        ck = tmp_path / f"ckpt{stage}"
        _deepspeed(tmp_path, 2, "full", str(stage), str(ck), str(tmp_path / "truth.pt"), "0", extra)
        r = run_cli("remap", str(ck), "--target", "models.py:target", "--rename", "enc.=encoder.", "--in-place",
                    cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        _deepspeed(tmp_path, 2, "resume", str(stage), str(ck), str(tmp_path / "got.pt"), "0", extra)
        worst = _max_diff(tmp_path / "truth.pt", tmp_path / "got.pt", _new_name, keys)[0]
        assert worst <= 1e-6, (extra, worst)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resumes_with_the_lr_set_halved(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed")
    _project(tmp_path)
    ck = tmp_path / "ckpt"
    _deepspeed(tmp_path, 1, "half", str(stage), str(ck), str(tmp_path / "truth.pt"), "0")
    r = run_cli("set", str(ck), "--scale-lr", "0.5", "--in-place")
    assert r.returncode == 0, r.stderr
    # the same model code: only the lr changes; `resume` builds New, so rename it back through remap
    r = run_cli("remap", str(ck), "--target", "models.py:target", "--rename", "enc.=encoder.", "--in-place",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _deepspeed(tmp_path, 1, "resume", str(stage), str(ck), str(tmp_path / "got.pt"), "0")
    worst, want_lr, got_lr = _max_diff(tmp_path / "truth.pt", tmp_path / "got.pt", _new_name)
    assert got_lr == [0.005, 0.005] == want_lr
    assert worst <= 1e-6, worst


# ---------------------------------------------------------------------------------------------
# two data-parallel ranks and bf16, as DeepSpeed 0.19.8 wrote them (CPU, gloo, two processes):
# fixtures/zero_ckpts_more/w2/stage0-3 and bf16/stage1-3, both two ranks (ZeRO 1 with bf16 is DeepSpeed's
# BF16_Optimizer: bf16_zero_pp_rank_* files, fp32 partitions saved with their padding)

MORE = FIXTURES / "zero_ckpts_more"
_FILES = [(kind, stage) for kind in ("w2", "bf16") for stage in (1, 2, 3)]


def _same_tree(a, b, path="", keep=None) -> None:
    """Equal structure and values (tensors bit for bit, placeholders structurally); ``keep``: the
    elements of a flat stage-3 partition that hold data (DeepSpeed leaves its slice padding as
    uninitialised memory)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad, path
        sub = re.search(r"fp32_flat_groups\[(\d+)\]$|/state/(\d+)/[^/]+$", path)
        if keep is not None and sub and a.dim() == 1:
            mask = keep[int(sub.group(1) or sub.group(2))]
            a, b = a[mask], b[mask]
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            _same_tree(a[k], b[k], f"{path}/{k}", keep)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tree(x, y, f"{path}[{i}]", keep)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("kind,stage", _FILES)
def test_rewriting_unchanged_reproduces_deepspeeds_own_files(zero, tmp_path, kind, stage):
    """A remap onto the unchanged code rebuilds every rank's partitions, paddings, fragment addresses
    and param_shapes exactly as DeepSpeed wrote them."""
    src = tmp_path / "src"
    shutil.copytree(MORE / kind / f"stage{stage}", src)
    (tmp_path / "same.py").write_text(textwrap.dedent('''
        import torch
        def build():
            m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
            groups = [{"params": [m[0].weight, m[2].weight]},
                      {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0}]
            return m, torch.optim.AdamW(groups, lr=1e-2)
    '''))
    out = tmp_path / "out"
    r = run_cli("remap", str(src), "--target", f"{tmp_path / 'same.py'}:build", "-o", str(out))
    assert r.returncode == 0, r.stderr
    a, b = load(src), load(out)
    assert sorted(p.relpath for p in a.parts) == sorted(p.relpath for p in b.parts)
    files = [p.relpath for p in a.parts]
    assert sum("optim_states" in f for f in files) == 2
    assert all(os.path.basename(f).startswith("bf16_") == (kind == "bf16") for f in files if "optim_states" in f)
    objs = {p.relpath: p.obj for p in b.parts}
    for p in a.parts:
        keep = None
        rank = re.match(r".*zero_pp_rank_(\d+)_mp_rank_00_optim_states", p.relpath)
        if stage == 3 and rank:
            world = 2
            r = int(rank.group(1))
            keep = [torch.cat([torch.arange(-(-s.numel() // world)) + r * -(-s.numel() // world) < s.numel()
                               for s in g.values()]) for g in a.parts[0].obj["param_shapes"]]
        _same_tree(p.obj, objs[p.relpath], p.relpath, keep)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_read_by_name_like_stage0(stage):
    sd = torch.load(MORE / "w2" / "stage0" / "global_step3" / "mp_rank_00_model_states.pt", weights_only=True)
    osd = sd["optimizer"]
    index = [i for g in osd["param_groups"] for i in g["params"]]
    truth = {NAMES[index.index(i)]: v for i, v in osd["state"].items()}
    ck = load(MORE / "w2" / f"stage{stage}")
    assert ck.extras["world_size"] == 2
    opt = ck.optimizer()
    for n in NAMES:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt.state[n][k], truth[n][k], atol=1e-6, rtol=0), (n, k)
        assert torch.allclose(ck.models[0].tensors[n], sd["module"][n], atol=1e-6, rtol=0), n


def test_two_ranks_and_bf16_check_and_diff(zero):
    for kind in ("w2", "bf16"):
        for stage in (1, 2, 3):
            d = MORE / kind / f"stage{stage}"
            assert run_cli("check", str(d), "--target", f"{zero / 'targets.py'}:reordered").returncode == 1
        r = run_cli("diff", str(MORE / kind / "stage1"), str(MORE / kind / "stage2"), "--only", "optimizer",
                    "--atol", "1e-6")
        assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("kind,stage", _FILES)
def test_two_ranks_and_bf16_remap_by_name(zero, tmp_path, kind, stage):
    src = tmp_path / "src"
    shutil.copytree(MORE / kind / f"stage{stage}", src)
    r = run_cli("remap", str(src), "--target", f"{zero / 'targets.py'}:reordered", "--in-place")
    assert r.returncode == 0, r.stderr
    old, new = _by_name(load(MORE / kind / f"stage{stage}")), _by_name(load(src))
    for n in NAMES:
        assert all(torch.equal(new[n][k], v) for k, v in old[n].items()), n
    assert run_cli("check", str(src), "--target", f"{zero / 'targets.py'}:reordered").returncode == 0


def test_stage0_directory_follows_latest(zero, tmp_path):
    r = run_cli("inspect", str(zero / "stage0"), "--format", "json")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = run_cli("remap", str(zero / "stage0"), "--target", f"{zero / 'targets.py'}:reordered", "-o", str(out))
    assert r.returncode == 0, r.stderr
    # the layout is kept: latest and the step directory (tests/test_deepspeed_stage0.py resumes it in DeepSpeed)
    assert (out / "latest").read_text().strip() == "global_step3"
    osd = torch.load(out / "global_step3" / "mp_rank_00_model_states.pt", weights_only=True)["optimizer"]
    old = torch.load(zero / "stage0" / "global_step3" / "mp_rank_00_model_states.pt", weights_only=True)["optimizer"]
    assert torch.equal(osd["state"][0]["exp_avg"], old["state"][1]["exp_avg"])  # 2.weight now first


# how fixtures/zero_ckpts_more was written: `python gen.py OUT 0` (w2) and `python gen.py OUT 1` (bf16),
# each as two gloo processes (RANK 0/1, WORLD_SIZE 2, DS_ACCELERATOR=cpu); DeepSpeed's zero_to_*.py left out
_GEN_MORE = """
import os, sys
import torch
import deepspeed
import deepspeed.comm.torch as ds_comm

ds_comm.build_shm_op = lambda: None
out, bf16 = sys.argv[1], sys.argv[2] == "1"
deepspeed.init_distributed(dist_backend="gloo")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
for stage in ((1, 2, 3) if bf16 else (0, 1, 2, 3)):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    groups = [{"params": [model[0].weight, model[2].weight]},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
    cfg = {"train_batch_size": 2 * world, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    for i in range(3):
        g = torch.Generator().manual_seed(1 + 10 * i + rank)
        loss = engine(torch.randn(2, 5, generator=g).to(dtype)).float().pow(2).sum()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(os.path.join(out, f"stage{stage}"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["w2", "bf16"])
def test_freshly_written_two_rank_files_match_the_committed_ones(tmp_path, kind):
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed")
    (tmp_path / "gen.py").write_text(_GEN_MORE)
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "gen.py", str(tmp_path / "out"), "1" if kind == "bf16" else "0"],
                              cwd=tmp_path, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out = p.communicate(timeout=900)[0]
        assert p.returncode == 0, out[-3000:]
    for stage in (1, 2, 3):
        a, b = _by_name(load(tmp_path / "out" / f"stage{stage}")), _by_name(load(MORE / kind / f"stage{stage}"))
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[n][k], v, atol=1e-6, rtol=0) for n in a for k, v in b[n].items())
