"""torch.distributed.checkpoint directories written by torch itself: single- and multi-rank."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import FIXTURES, ROOT, invoke, run_two_ranks
from models_zoo import BlockReordered, TinyGPT, gpt_loss
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _train(model, opt, steps=2):
    for s in range(steps):
        opt.zero_grad()
        gpt_loss(model, s).backward()
        opt.step()


def _dcp_save(state, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


@pytest.fixture
def dcp_ckpt(tmp_path):
    torch.manual_seed(0)
    m = TinyGPT(n_layer=2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    _train(m, opt)
    msd, osd = get_state_dict(m, opt)
    path = tmp_path / "step-2"
    _dcp_save({"model": msd, "optimizer": osd, "lr_scheduler": sched.state_dict(), "extra": {"step": 2}}, path)
    return path, m, opt


def test_inspect_from_metadata(dcp_ckpt):
    path, m, _ = dcp_ckpt
    r = invoke("inspect", str(path), "--format", "json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["layout"] == "dcp"
    assert [t["name"] for t in rep["models"][0]["tensors"]] == list(m.state_dict())
    opt = rep["optimizers"][0]
    assert opt["name_evidence"] == "fqn" and opt["ambiguous"] == 0
    assert [e["inferred_name"] for e in opt["entries"]] == [n for n, _ in m.named_parameters()]
    assert rep["schedulers"][0]["type"] == "StepLR" and rep["extras"]["step"] == 2


def test_diff_and_check_by_name(dcp_ckpt, tmp_path):
    path, m, opt = dcp_ckpt
    assert invoke("diff", str(path), str(path)).exit_code == 0
    # the same state saved as a plain torch file compares identical, by name
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(),
                "lr_scheduler": torch.load(FIXTURES / "bundle.pt", weights_only=True)["lr_scheduler"]},
               tmp_path / "same.pt")
    r = invoke("diff", str(path), str(tmp_path / "same.pt"), "--only", "model", "--only", "optimizer",
               "--format", "json")
    assert r.exit_code == 0, r.stdout
    target = str(ROOT / "tests" / "models_zoo.py") + ":gpt_reordered_blocks"
    # the reordered blocks load fine by name; a model with other shapes does not
    r = invoke("check", str(path), "--target", str(ROOT / "tests" / "models_zoo.py") + ":gpt_plain", "--format",
               "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and rep["counts"]["missing"] > 0  # gpt_plain has 3 layers: h.2.* is new
    del target


def test_convert_legacy_to_dcp_resumes_with_set_optimizer_state_dict(tmp_path):
    """An index-based torch.save checkpoint -> DCP (FQN-keyed, torchtitan keys) -> the DCP resume path
    of a *reordered* model: one more step equals the uninterrupted run."""
    torch.manual_seed(0)
    m = TinyGPT(n_layer=2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    _train(m, opt, 3)
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, tmp_path / "legacy.pt")
    saved_model = {k: v.clone() for k, v in m.state_dict().items()}
    _train(m, opt, 1)  # the uninterrupted run's next step (seed 0 batch)
    reference = {n: p.detach().clone() for n, p in m.named_parameters()}

    out = tmp_path / "dcp"
    r = invoke("convert", str(tmp_path / "legacy.pt"), "--to", "dcp", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    new = TinyGPT(n_layer=2, block=BlockReordered)
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    msd, osd = get_state_dict(new, new_opt)
    state = {"model": msd, "optimizer": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(out), no_dist=True)
    set_state_dict(new, new_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for k, v in saved_model.items():
        assert torch.equal(new.state_dict()[k], v)
    _train(new, new_opt, 1)
    for n, p in new.named_parameters():
        torch.testing.assert_close(p.detach(), reference[n], atol=1e-6, rtol=0)


def test_dcp_to_single_file_and_back(dcp_ckpt, tmp_path):
    path, _, _ = dcp_ckpt
    r = invoke("convert", str(path), "--to", "torch", "-o", str(tmp_path / "one.pt"))
    assert r.exit_code == 0, r.stderr
    assert invoke("diff", str(path), str(tmp_path / "one.pt")).exit_code == 0
    r = invoke("convert", str(tmp_path / "one.pt"), "--to", "dcp", "-o", str(tmp_path / "again"))
    assert r.exit_code == 0, r.stderr
    assert invoke("diff", str(path), str(tmp_path / "again")).exit_code == 0
    r = invoke("convert", str(path), "--to", "safetensors", "-o", str(tmp_path / "m.safetensors"))
    assert r.exit_code == 0
    assert invoke("diff", str(path), str(tmp_path / "m.safetensors"), "--only", "model").exit_code == 0
    r = invoke("convert", str(path), "--to", "torch", "-o", str(tmp_path / "one.pt"))
    assert r.exit_code == 2 and "already exists" in r.stderr


def test_hostile_metadata_and_bytes_never_run(dcp_ckpt, tmp_path):
    path, _, _ = dcp_ckpt
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad_meta"
    bad.mkdir()
    for n in os.listdir(path):
        (bad / n).write_bytes((path / n).read_bytes())
    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    r = invoke("inspect", str(bad))
    assert r.exit_code == 2 and "posix.system" in r.stderr and not marker.exists()
    evil_bytes = tmp_path / "bad_bytes"
    _dcp_save({"model": {"w": torch.ones(2)}, "extra": {"x": Evil()}}, evil_bytes)
    assert not marker.exists()
    r = invoke("inspect", str(evil_bytes))
    assert r.exit_code == 2 and not marker.exists()


class Wrapped(torch.nn.Module):
    """The new code: the model now sits under ``net.``, its blocks reordered, one block fewer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyGPT(n_layer=1, block=BlockReordered)


def test_remap_dcp_renames_and_drops_in_metadata(dcp_ckpt, tmp_path):
    path, m, opt = dcp_ckpt
    target = tmp_path / "wrapped.py"
    target.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                      "from test_dcp import Wrapped\n\ndef build():\n    return Wrapped()\n")
    out = tmp_path / "fixed"
    r = invoke("remap", str(path), "--target", f"{target}:build", "-o", str(out), "--format", "json")
    assert r.exit_code == 0, r.stdout + r.stderr
    shards = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))
    for n in shards:  # shard files copied as they are: nothing re-serialised
        assert (out / n).read_bytes() == (path / n).read_bytes()
    new = Wrapped()
    new_opt = torch.optim.AdamW(new.parameters(), lr=1e-2)
    msd, osd = get_state_dict(new, new_opt)
    state = {"model": msd, "optimizer": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(out), no_dist=True)  # torch's own reader
    set_state_dict(new, new_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    old_state = {n: opt.state[p] for n, p in m.named_parameters()}
    for n, p in new.named_parameters():
        old = n.removeprefix("net.")
        assert torch.equal(p.detach(), dict(m.named_parameters())[old].detach())
        assert torch.equal(new_opt.state[p]["exp_avg"], old_state[old]["exp_avg"])
    rep = json.loads(invoke("inspect", str(out), "--format", "json").stdout)
    names = [e["inferred_name"] for e in rep["optimizers"][0]["entries"]]
    assert all(n.startswith("net.") for n in names) and not any(".h.1." in n for n in names)


MULTI_RANK = r"""
import os, sys, warnings
import torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard
warnings.simplefilter("ignore")
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(0)
full = {"embed.weight": torch.randn(8, 4), "head.weight": torch.randn(6, 4), "head.bias": torch.randn(6)}
model = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
state = {k: {"step": torch.tensor(3.0), "exp_avg": distribute_tensor(v * 0.1, mesh, [Shard(0)]),
             "exp_avg_sq": distribute_tensor(v * v, mesh, [Shard(0)])} for k, v in full.items()}
opt = {"state": state, "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
       "amsgrad": False, "params": list(full)}]}
dcp.save({"model": model, "optimizer": opt}, checkpoint_id=sys.argv[1])
if dist.get_rank() == 0:
    torch.save(full, sys.argv[1] + ".full.pt")
dist.destroy_process_group()
"""


def test_multi_rank_save_two_processes(tmp_path):
    """A real 2-process gloo save of row-sharded tensors: two shard files; optckpt reads whole tensors."""
    out = tmp_path / "multi"
    run_two_ranks(MULTI_RANK, out, tmp_path)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".distcp"))
    assert len(shards) == 2
    full = torch.load(str(out) + ".full.pt", weights_only=True)
    r = invoke("inspect", str(out), "--format", "json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert {t["name"]: t["shape"] for t in rep["models"][0]["tensors"]} == {k: list(v.shape) for k, v in full.items()}
    import optckpt

    ck = optckpt.load(out)
    for k, v in full.items():
        assert torch.equal(ck.models[0].tensors[k], v)  # both shards, reassembled by DCP
    r = invoke("convert", str(out), "--to", "torch", "-o", str(tmp_path / "one.pt"))
    assert r.exit_code == 0, r.stderr
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    assert torch.equal(one["optimizer"]["state"]["head.weight"]["exp_avg_sq"], full["head.weight"] ** 2)
