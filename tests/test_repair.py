"""remap beyond reorders: model state dicts follow the optimizer (strict loads), model-only targets keep
the saved grouping, fused / split / sliced parameters continue training exactly."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import repair_models as rm
import torch
from conftest import FIXTURES, invoke, run_cli

import optckpt
import optckpt.verify

MODELS = str(FIXTURES / "repair_models.py")
QKV = r"re:qkv\.(weight|bias)=q.\1+k.\1+v.\1"
TOL = 1e-6


def _batch(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rm.D, generator=g), torch.randn(n, 2, generator=g)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x, y = _batch(seed)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _save(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, **extra) -> str:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, **extra}, path)
    return str(path)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


# --- (1) model keys follow the optimizer ---------------------------------------------------------

def test_rename_bundle_loads_strict_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    old = rm.Net("enc")
    opt = torch.optim.AdamW(rm.decay_groups(old), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    for s in range(3):
        old.train()
        _step(old, opt, s)
        sched.step()
    ck = _save(tmp_path / "ck.pt", old, opt, lr_scheduler=sched.state_dict())
    before = open(ck, "rb").read()
    out = tmp_path / "fixed.pt"
    r = invoke("remap", ck, "--target", f"{MODELS}:build_renamed_adamw", "--rename", "enc.=encoder.",
               "-o", str(out), "--format", "json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["models"][0]["rewritten"] and plan["models"][0]["renamed"] == 2
    assert open(ck, "rb").read() == before
    fixed = torch.load(out, weights_only=True)
    new, new_opt = rm.build_renamed_adamw()
    new.load_state_dict(fixed["model"], strict=True)  # the unchanged resume script
    new_opt.load_state_dict(fixed["optimizer"])
    assert torch.equal(new.bn.running_mean, old.bn.running_mean)  # buffers follow their module
    _step(old, opt, 9)
    _step(new, new_opt, 9)
    for name, p in old.named_parameters():
        _close(dict(new.named_parameters())[name.replace("enc.", "encoder.", 1)], p)


def test_removed_and_new_parameters_model_file_layout(tmp_path):
    torch.manual_seed(0)
    old = rm.Net("enc", blocks=2)
    opt = torch.optim.Adam(old.parameters(), lr=1e-2)
    for s in range(2):
        _step(old, opt, s)
    torch.save(old.state_dict(), tmp_path / "model_0.pth")
    torch.save(opt.state_dict(), tmp_path / "optimizer_0.pth")
    # new code: one block fewer (its weight, bias dropped); the model file is written to --model-output
    shrunk = tmp_path / "shrunk.py"
    shrunk.write_text(f"import sys; sys.path.insert(0, {os.path.dirname(MODELS)!r})\nimport repair_models as rm\n"
                      "def build():\n    return rm.Net('enc', blocks=1)\n")
    r = invoke("remap", str(tmp_path / "optimizer_0.pth"), "--model", str(tmp_path / "model_0.pth"),
               "--target", f"{shrunk}:build", "-o", str(tmp_path / "o.pth"),
               "--model-output", str(tmp_path / "m.pth"))
    assert r.exit_code == 0, r.stderr
    assert "blocks.1.weight" in r.stdout
    new = rm.Net("enc", blocks=1)
    new.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True), strict=True)
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    new_opt.load_state_dict(torch.load(tmp_path / "o.pth", weights_only=True))
    assert torch.equal(new.head.weight, old.head.weight)
    # without --model-output the model file is left alone and the plan says so
    r = invoke("remap", str(tmp_path / "optimizer_0.pth"), "--model", str(tmp_path / "model_0.pth"),
               "--target", f"{shrunk}:build", "--dry-run")
    assert r.exit_code == 0 and "--model-output" in r.stdout


def test_lightning_wrapper_prefix_is_kept(tmp_path):
    torch.manual_seed(0)
    old = rm.Separate()
    opt = torch.optim.SGD(old.parameters(), lr=0.1, momentum=0.9)
    _step(old, opt, 0)
    sd = {f"net.{k}": v for k, v in old.state_dict().items()}
    torch.save({"state_dict": sd, "optimizer_states": [opt.state_dict()], "lr_schedulers": [], "epoch": 0,
                "global_step": 1, "pytorch-lightning_version": "2.4.0"}, tmp_path / "l.ckpt")
    r = invoke("remap", str(tmp_path / "l.ckpt"), "--target", f"{MODELS}:build_fused", "--fuse", QKV,
               "-o", str(tmp_path / "f.ckpt"))
    assert r.exit_code == 0, r.stderr
    got = torch.load(tmp_path / "f.ckpt", weights_only=True)["state_dict"]
    assert set(got) == {"net.qkv.weight", "net.qkv.bias", "net.out.weight", "net.out.bias"}
    assert torch.equal(got["net.qkv.weight"], torch.cat([old.q.weight, old.k.weight, old.v.weight]))


# --- (2) a model-only target keeps the saved grouping -------------------------------------------

def test_model_only_target_keeps_decay_groups(tmp_path):
    torch.manual_seed(0)
    old = rm.Net("enc", blocks=2)
    opt = torch.optim.AdamW(rm.decay_groups(old, wd=0.05), lr=1e-2)
    for s in range(2):
        _step(old, opt, s)
    ck = _save(tmp_path / "ck.pt", old, opt)
    out = tmp_path / "fixed.pt"
    r = invoke("remap", ck, "--target", f"{MODELS}:build_three_blocks", "-o", str(out), "--format", "json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    notes = " ".join(plan["notes"])
    assert "new parameter blocks.2.weight joins saved group 0 (like blocks.0.weight)" in notes
    assert "new parameter blocks.2.bias joins saved group 1 (like blocks.0.bias)" in notes
    fixed = torch.load(out, weights_only=True)
    new = rm.build_three_blocks()
    new.load_state_dict(fixed["model"], strict=True)
    # the resume script builds its decay / no-decay optimizer: groups, membership and hparams line up
    new_opt = torch.optim.AdamW(rm.decay_groups(new, wd=0.05), lr=1e-2)
    new_opt.load_state_dict(fixed["optimizer"])
    names = {id(p): n for n, p in new.named_parameters()}
    for g, saved in zip(new_opt.param_groups, fixed["optimizer"]["param_groups"]):
        assert [names[id(p)] for p in g["params"]] == saved["param_names"]
    assert [g["weight_decay"] for g in fixed["optimizer"]["param_groups"]] == [0.05, 0.0]
    assert torch.equal(new_opt.state[new.enc.weight]["exp_avg"], opt.state[old.enc.weight]["exp_avg"])
    assert new_opt.state.get(new.blocks[2].weight) in (None, {})


# --- (3) fuse / split ----------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05, initial_accumulator_value=0.1),
}


def _train_separate(tmp_path: Path, make, steps: int = 3):
    old = rm.build_separate()
    opt = make(old.parameters())
    for s in range(steps):
        _step(old, opt, s)
    return old, opt, _save(tmp_path / "sep.pt", old, opt)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_fuse_continues_exactly_and_split_round_trips(tmp_path, kind):
    make = OPTIMIZERS[kind]
    old, opt, ck = _train_separate(tmp_path, make)
    fused_path = tmp_path / "fused.pt"
    r = invoke("remap", ck, "--target", f"{MODELS}:build_fused", "--fuse", QKV, "-o", str(fused_path))
    assert r.exit_code == 0, r.stderr
    fixed = torch.load(fused_path, weights_only=True)
    new = rm.build_fused()
    new.load_state_dict(fixed["model"], strict=True)
    new_opt = make(new.parameters())
    new_opt.load_state_dict(fixed["optimizer"])
    _step(old, opt, 7)
    _step(new, new_opt, 7)
    _close(new.qkv.weight, torch.cat([old.q.weight, old.k.weight, old.v.weight]))
    _close(new.qkv.bias, torch.cat([old.q.bias, old.k.bias, old.v.bias]))
    _close(new.out.weight, old.out.weight)
    # split is the inverse: back to the old code, bit for bit
    back = tmp_path / "back.pt"
    r = invoke("remap", str(fused_path), "--target", f"{MODELS}:build_separate",
               "--split", r"re:qkv\.(weight|bias)=q.\1+k.\1+v.\1@0", "-o", str(back))
    assert r.exit_code == 0, r.stderr
    orig, again = torch.load(ck, weights_only=True), torch.load(back, weights_only=True)
    assert list(again["model"]) == list(orig["model"])
    assert all(torch.equal(again["model"][k], orig["model"][k]) for k in orig["model"])
    assert optckpt.verify.same_bits(again["optimizer"]["state"], orig["optimizer"]["state"])


def test_api_fuse_equals_cli(tmp_path):
    make = OPTIMIZERS["adam"]
    old, opt, ck = _train_separate(tmp_path, make)
    new = rm.build_fused()
    new_opt = make(new.parameters())
    rep = optckpt.load_optimizer_state_dict(new_opt, new, ck, fuse=[QKV])
    assert sorted(rep.transformed) == ["qkv.bias", "qkv.weight"] and not rep.unexpected
    assert torch.equal(new_opt.state[new.qkv.weight]["exp_avg_sq"],
                       torch.cat([opt.state[p]["exp_avg_sq"] for p in (old.q.weight, old.k.weight, old.v.weight)]))


def test_fuse_dim1_and_size_mismatch(tmp_path):
    _, _, ck = _train_separate(tmp_path, OPTIMIZERS["adam"])
    r = invoke("remap", ck, "--target", f"{MODELS}:build_fused", "--fuse", "qkv.weight=q.weight+k.weight@0",
               "-o", str(tmp_path / "x.pt"))
    assert r.exit_code == 2 and "add up to [16, 8]" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()
    r = invoke("remap", ck, "--target", f"{MODELS}:build_fused", "--fuse", "nothing.weight=q.weight+k.weight",
               "-o", str(tmp_path / "x.pt"))
    assert r.exit_code == 2 and "matches no target parameter" in r.stderr


@pytest.mark.parametrize("kind", ["adafactor", "lbfgs", "step"])
def test_fuse_refusals_write_nothing(tmp_path, kind):
    old = rm.build_separate()
    if kind == "adafactor":
        opt = torch.optim.Adafactor(old.parameters(), lr=1e-2)
        for s in range(2):
            _step(old, opt, s)
    elif kind == "lbfgs":
        opt = torch.optim.LBFGS(old.parameters(), lr=0.1)
        x, y = _batch(0)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(old(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    else:  # v frozen for the first step: its step count differs from q's and k's
        opt = torch.optim.Adam(old.parameters(), lr=1e-2)
        old.v.requires_grad_(False)
        _step(old, opt, 0)
        old.v.requires_grad_(True)
        _step(old, opt, 1)
    ck = _save(tmp_path / "ck.pt", old, opt)
    out = tmp_path / "out.pt"
    p = run_cli("remap", ck, "--target", f"{MODELS}:build_fused", "--fuse", QKV, "-o", str(out))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("optckpt: error:")
    why = {"adafactor": "Adafactor keeps factored", "lbfgs": "LBFGS keeps one flat",
           "step": "'step' differs between the parts"}[kind]
    assert why in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not out.exists() and os.listdir(tmp_path) == ["ck.pt"]


# --- (4) slice -----------------------------------------------------------------------------------

def _train_lm(tmp_path: Path, make, vocab: int = 10):
    model = rm.build_lm(vocab)
    opt = make(model.parameters())
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, vocab, (4, 5), generator=g)
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()
    return model, opt, _save(tmp_path / "lm.pt", model, opt)


@pytest.mark.parametrize("target,rows", [("build_lm_grown", 13), ("build_lm_shrunk", 7)])
def test_slice_vocab_growth_and_shrink(tmp_path, target, rows):
    model, opt, ck = _train_lm(tmp_path, OPTIMIZERS["adamw"])
    out = tmp_path / "fixed.pt"
    r = invoke("remap", ck, "--target", f"{MODELS}:{target}", "--shape-mismatch", "slice", "-o", str(out),
               "--format", "json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["summary"]["slice"] == 1
    assert {"kind": "slice", "name": "emb.weight", "from_shape": [10, 8], "to_shape": [rows, 8]} in plan["transforms"]
    fixed = torch.load(out, weights_only=True)
    keep = min(rows, 10)
    w = fixed["model"]["emb.weight"]
    assert w.shape == (rows, 8) and torch.equal(w[:keep], model.emb.weight.detach()[:keep])
    init = rm.build_lm(rows).emb.weight.detach()  # the target's own initialisation
    assert torch.equal(w[keep:], init[keep:])
    st = fixed["optimizer"]["state"][0]
    saved = opt.state[model.emb.weight]
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(st[k][:keep], saved[k][:keep]) and not st[k][keep:].any()
    assert torch.equal(st["step"], saved["step"])
    new = rm.build_lm(rows)
    new.load_state_dict(fixed["model"], strict=True)
    new_opt = torch.optim.AdamW(new.parameters(), lr=1e-2, weight_decay=0.1)
    new_opt.load_state_dict(fixed["optimizer"])


def test_slice_adagrad_accumulator_and_api(tmp_path):
    model, opt, ck = _train_lm(tmp_path, OPTIMIZERS["adagrad"])
    new = rm.build_lm(13)
    new_opt = OPTIMIZERS["adagrad"](new.parameters())
    rep = optckpt.load_optimizer_state_dict(new_opt, new, ck, shape_mismatch="slice")
    assert rep.transformed == ["emb.weight"]
    got = new_opt.state[new.emb.weight]["sum"]
    assert torch.equal(got[:10], opt.state[model.emb.weight]["sum"])
    assert torch.equal(got[10:], torch.full((3, 8), 0.1))


def test_dry_run_shows_transforms_and_writes_nothing(tmp_path):
    _, _, ck = _train_separate(tmp_path, OPTIMIZERS["adam"])
    r = invoke("remap", ck, "--target", f"{MODELS}:build_fused", "--fuse", QKV, "--dry-run", "--format", "json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert {"kind": "fuse", "name": "qkv.weight", "parts": ["q.weight", "k.weight", "v.weight"],
            "dim": 0} in plan["transforms"]
    assert plan["written"] is None and os.listdir(tmp_path) == ["sep.pt"]
    assert plan["models"][0]["fused"] == ["qkv.weight", "qkv.bias"]


_WRAPPED_HF = '''
import torch
from transformers import AutoConfig, GPT2LMHeadModel


class Wrapped(torch.nn.Module):  # the new code keeps the HF model one attribute deeper
    def __init__(self, ckpt):
        super().__init__()
        torch.manual_seed(0)
        self.lm = GPT2LMHeadModel(AutoConfig.from_pretrained(ckpt))


def build():
    return Wrapped(CKPT)
'''


def test_hf_trainer_model_safetensors_keys_follow_the_optimizer(tmp_path):
    """A Trainer directory's model.safetensors is rewritten with the optimizer's new names (its
    __metadata__ kept, the tied lm_head stored once as transformers stores it), verified."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    src = FIXTURES / "hf_trainer" / "checkpoint-3"
    target = tmp_path / "wrapped.py"
    target.write_text(f"CKPT = {str(src)!r}\n" + _WRAPPED_HF)
    r = invoke("remap", str(src), "--target", f"{target}:build", "-o", str(tmp_path / "out"))
    assert r.exit_code == 0, r.stderr
    assert "model model.safetensors: 28 keys renamed" in r.stdout, r.stdout
    old, new = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(new) == {"lm." + k for k in old} and all(torch.equal(new["lm." + k], v) for k, v in old.items())
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}
    spec = importlib.util.spec_from_file_location("wrapped", target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build()
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert unexpected == [] and missing == ["lm.lm_head.weight"]  # tied to wte, which it is after the load
    assert model.lm.lm_head.weight.data_ptr() == model.lm.transformer.wte.weight.data_ptr()
    opt = torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True)
    assert opt["param_groups"][0]["param_names"][0].startswith("lm.")
