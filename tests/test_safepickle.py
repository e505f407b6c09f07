"""Checkpoints that pickle Python objects next to the state dicts (``args``, whole models), read and
repaired without ``--trust-pickle``: torchvision-reference and timm ``CheckpointSaver`` layouts,
a whole pickled ``nn.Module``. Repaired files resume equal to the uninterrupted run, and keep
``args`` equal (loaded with full pickle) with byte-identical storages."""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile

import models
import pytest
import torch
from conftest import FIXTURES, invoke, invoke_json

from optckpt.io.safepickle import PickledGlobal, PickledObject, fields_of, same
from optckpt.io.torchfile import load_torch_file

TARGET = str(FIXTURES / "models.py") + ":build_cnn_head_first"


def _reference_args(lr: float = 0.1) -> argparse.Namespace:
    """Parsed the way torchvision's references/classification/train.py parses its command line."""
    p = argparse.ArgumentParser(description="PyTorch Classification Training")
    p.add_argument("--data-path", default="/datasets01/imagenet_full_size/061417/", type=str)
    p.add_argument("--model", default="resnet18", type=str)
    p.add_argument("--device", default="cuda", type=str)
    p.add_argument("-b", "--batch-size", default=32, type=int)
    p.add_argument("--epochs", default=90, type=int)
    p.add_argument("--lr", default=0.1, type=float)
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    p.add_argument("--lr-step-size", default=30, type=int)
    p.add_argument("--lr-gamma", default=0.1, type=float)
    p.add_argument("--mixup-alpha", default=0.0, type=float)
    p.add_argument("--auto-augment", default=None, type=str)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--resume", default="", type=str)
    p.add_argument("--start-epoch", default=0, type=int)
    return p.parse_args(["--lr", str(lr), "--lr-step-size", "2", "--model", "smallcnn"])


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def _step(model, opt, sched):
    x, y = _data()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()


def _train_reference(tmp_path, lr: float = 0.1, name: str = "checkpoint.pth"):
    """Two epochs of SmallCNN, saved as torchvision's reference script saves (utils.save_on_master)."""
    torch.manual_seed(0)
    args = _reference_args(lr)
    model = models.SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step_size, gamma=args.lr_gamma)
    for _ in range(2):
        _step(model, opt, sched)
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                  "epoch": 1, "args": args}
    path = tmp_path / name
    torch.save(checkpoint, path)
    _step(model, opt, sched)  # the uninterrupted run's next epoch
    return path, {n: p.detach().clone() for n, p in model.named_parameters()}


def _storages(path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return sorted(hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist() if "/data/" in n
                      and not n.endswith("serialization_id"))


def test_reference_checkpoint_reads_without_trust(tmp_path):
    path, _ = _train_reference(tmp_path)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # what optckpt used to refuse with
    code, rep = invoke_json("inspect", str(path))
    assert code == 0
    (obj,) = rep["objects"]
    assert obj["key"] == "args" and obj["type"] == "argparse.Namespace" and obj["kind"] == "object"
    assert obj["fields"]["lr"] == 0.1 and obj["fields"]["model"] == "smallcnn" and obj["fields"]["amp"] is False
    assert rep["extras"] == {"epoch": 1} and rep["schedulers"][0]["type"] == "StepLR"
    text = invoke("inspect", str(path)).stdout
    assert "args: pickled object argparse.Namespace, 15 fields" in text
    assert "weight_decay" in text and "0.0001" in text  # the fields as a table


def test_reference_check_remap_resume_round_trip(tmp_path):
    path, uninterrupted = _train_reference(tmp_path)
    r = invoke("check", str(path), "--target", TARGET)
    assert r.exit_code == 1 and "NOT SAFE" in r.stdout, r.stdout + r.stderr
    out = tmp_path / "remapped.pth"
    r = invoke("remap", str(path), "--target", TARGET, "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    assert _storages(out) == _storages(path)  # every storage byte-identical, only relabelled
    # the resume path of the reference script, with the real classes importable (full pickle)
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    orig = torch.load(path, map_location="cpu", weights_only=False)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"] == orig["args"]
    model = models.SmallCNNHeadFirst()
    args = ckpt["args"]
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step_size, gamma=args.lr_gamma)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["lr_scheduler"])
    assert ckpt["epoch"] + 1 == 2
    _step(model, opt, sched)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), uninterrupted[n], atol=1e-6, rtol=0)
    # and again without trust: the written file reads back to the same placeholders
    assert same(load_torch_file(str(out)).obj["args"], load_torch_file(str(path)).obj["args"])
    code, rep = invoke_json("check", str(out), "--target", TARGET)
    assert code == 0 and rep["safe"]


def test_diff_shows_changed_args_by_field(tmp_path):
    a, _ = _train_reference(tmp_path, lr=0.1, name="a.pth")
    b, _ = _train_reference(tmp_path, lr=0.2, name="b.pth")
    code, rep = invoke_json("diff", str(a), str(b), "--only", "extra")
    assert code == 1
    args = [e for e in rep["entries"] if e["name"] == "args"]
    assert args == [{"section": "extra", "name": "args", "key": "lr", "status": "changed", "a": 0.1, "b": 0.2,
                     "max_abs_diff": pytest.approx(0.1), "rel_l2": None, "renamed_from": None}]
    code, rep = invoke_json("diff", str(a), str(a))
    assert code == 0 and rep["identical"]


@pytest.mark.parametrize("command", ["set", "reset", "convert"])
def test_edits_keep_args(tmp_path, command):
    path, _ = _train_reference(tmp_path)
    out = tmp_path / "out.pth"
    argv = {"set": ["set", str(path), "--scale-lr", "0.5", "-o", str(out)],
            "reset": ["reset", str(path), "--params", "classifier.*", "-o", str(out)],
            "convert": ["convert", str(path), "--to", "torch", "-o", str(out)]}[command]
    r = invoke(*argv)
    assert r.exit_code == 0, r.stdout + r.stderr
    got = torch.load(out, weights_only=False)
    # convert writes torchtitan's keys; what it does not know goes under "extra", written as it was read
    assert (got["extra"] if command == "convert" else got)["args"] == torch.load(path, weights_only=False)["args"]
    assert invoke("inspect", str(out)).exit_code == 0


def _timm_args() -> argparse.Namespace:
    """The fields timm's train.py parser gives the ones CheckpointSaver and resume read."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--opt", default="sgd")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=2e-5)
    p.add_argument("--sched", default="cosine")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--model-ema", action="store_true")
    return p.parse_args(["--model", "smallcnn", "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05"])


def _timm_groups(model, weight_decay):
    """create_optimizer_v2's default grouping: biases and norm weights (ndim <= 1) without decay."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def test_timm_checkpoint_saver_layout(tmp_path):
    """The dict timm 1.0's CheckpointSaver._save writes (timm itself needs torchvision to import,
    which does not install with this torch, so the saver's exact keys are written here)."""
    torch.manual_seed(0)
    args = _timm_args()
    model = models.SmallCNN()
    opt = torch.optim.AdamW(_timm_groups(model, args.weight_decay), lr=args.lr)
    for _ in range(2):
        x, y = _data()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    save_state = {"epoch": 1, "arch": args.model, "optimizer": opt.state_dict(), "version": 2, "args": args,
                  "state_dict": model.state_dict(), "metric": 0.25,
                  "saver": {"checkpoint_files": [("checkpoint-1.pth.tar", 0.25)], "best_epoch": 1,
                            "best_metric": 0.25, "pending": (1, 0.25)}}
    path = tmp_path / "last.pth.tar"
    torch.save(save_state, path)
    x, y = _data()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}

    code, rep = invoke_json("inspect", str(path))
    assert code == 0 and rep["layout"] == "timm"
    assert rep["objects"][0]["fields"]["opt"] == "adamw"
    out = tmp_path / "remapped.pth.tar"
    target = tmp_path / "timm_target.py"
    target.write_text("import torch, models\n"
                      "def build():\n"
                      "    m = models.SmallCNNHeadFirst()\n"
                      "    no_decay = [p for p in m.parameters() if p.ndim <= 1]\n"
                      "    decay = [p for p in m.parameters() if p.ndim > 1]\n"
                      "    return m, torch.optim.AdamW([{'params': no_decay, 'weight_decay': 0.0},\n"
                      "                                 {'params': decay, 'weight_decay': 0.05}], lr=1e-3)\n")
    r = invoke("remap", str(path), "--target", f"{target}:build", "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    assert _storages(out) == _storages(path)
    # timm.models.resume_checkpoint: full torch.load, model, optimizer, epoch + 1 for version > 1
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["args"] == args and ckpt["saver"] == save_state["saver"]
    new = models.SmallCNNHeadFirst()
    new.load_state_dict(ckpt["state_dict"])
    opt2 = torch.optim.AdamW(_timm_groups(new, ckpt["args"].weight_decay), lr=ckpt["args"].lr)
    opt2.load_state_dict(ckpt["optimizer"])
    x, y = _data()
    opt2.zero_grad()
    torch.nn.functional.cross_entropy(new(x), y).backward()
    opt2.step()
    for n, p in new.named_parameters():
        torch.testing.assert_close(p.detach(), uninterrupted[n], atol=1e-6, rtol=0)


def test_whole_pickled_module(tmp_path):
    """``torch.save(model)`` and YOLO's ``{'model': <module>, 'optimizer': ...}``: the parameters
    are found inside the placeholder, by attribute path; rewriting it needs --trust-pickle."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(models.SmallCNN(), torch.nn.Identity())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    whole = tmp_path / "model.pt"
    torch.save(net, whole)
    code, rep = invoke_json("inspect", str(whole))
    assert code == 0 and rep["layout"] == "torch-model"
    assert [t["name"] for t in rep["models"][0]["tensors"]] == list(net.state_dict())
    yolo = tmp_path / "last.pt"
    torch.save({"epoch": 3, "best_fitness": 0.5, "model": net, "ema": None, "updates": 7,
                "optimizer": opt.state_dict(), "train_args": {"lr0": 0.1}, "date": "2025-01-01"}, yolo)
    code, rep = invoke_json("inspect", str(yolo))
    assert code == 0
    assert rep["models"][0]["name"] == "model" and rep["models"][0]["num_tensors"] == len(net.state_dict())
    assert rep["optimizers"][0]["entries"][0]["inferred_name"] == "0.conv.weight"
    assert rep["objects"][0]["kind"] == "model" and rep["objects"][0]["type"] == "torch.nn.modules.container.Sequential"
    assert invoke("diff", str(yolo), str(yolo)).exit_code == 0
    target = str(tmp_path / "t.json")
    with open(target, "w") as f:
        json.dump([n for n, _ in net.named_parameters()], f)
    assert invoke("check", str(yolo), "--target", target).exit_code == 0
    r = invoke("remap", str(yolo), "--target", target, "-o", str(tmp_path / "o.pt"))
    assert r.exit_code == 2 and "--trust-pickle" in r.stderr and "Sequential" in r.stderr
    assert not (tmp_path / "o.pt").exists()
    # with trust the real module is rewritten (the re-read for --verify would be the placeholder: skipped)
    r = invoke("remap", str(yolo), "--target", target, "-o", str(tmp_path / "o.pt"), "--trust-pickle", "--no-verify")
    assert r.exit_code == 0, r.stderr
    assert isinstance(torch.load(tmp_path / "o.pt", weights_only=False)["model"], torch.nn.Sequential)


def test_placeholders_record_what_the_pickle_said(tmp_path):
    path, _ = _train_reference(tmp_path)
    args = load_torch_file(str(path)).obj["args"]
    assert isinstance(args, PickledObject) and args.opcode == "newobj"
    assert args.callable == PickledGlobal("argparse", "Namespace")
    assert fields_of(args)["batch_size"] == 32
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(path, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    assert same(load_torch_file(str(legacy)).obj["args"], args)


def _mmengine_run(tmp_path, iters: int, name: str):
    """mmengine 0.10's Runner.save_checkpoint layout (meta, state_dict, message_hub, optimizer,
    param_schedulers), from its real OptimWrapper, schedulers and MessageHub (the Runner itself
    needs OpenCV to import)."""
    pytest.importorskip("mmengine.optim")
    from mmengine.logging import MessageHub
    from mmengine.optim import OptimWrapper
    from mmengine.optim.scheduler import CosineAnnealingLR, LinearLR

    torch.manual_seed(0)
    model = models.SmallCNN()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    scheds = [LinearLR(wrapper, start_factor=0.1, by_epoch=False, begin=0, end=2),
              CosineAnnealingLR(wrapper, T_max=4, by_epoch=False, begin=2, end=6)]
    hub = MessageHub.get_instance(f"optckpt-{name}")

    def one(i):
        x, y = _data()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        wrapper.update_params(loss)
        for s in scheds:
            s.step()
        hub.update_scalar("train/loss", float(loss))
        hub.update_info("iter", i + 1)

    for i in range(iters):
        one(i)
    ckpt = {"meta": {"epoch": 0, "iter": iters, "seed": 0, "experiment_name": name, "mmengine_version": "0.10.7"},
            "state_dict": model.state_dict(), "message_hub": hub.state_dict(), "optimizer": wrapper.state_dict(),
            "param_schedulers": [s.state_dict() for s in scheds]}
    path = tmp_path / f"{name}.pth"
    torch.save(ckpt, path)
    one(iters)
    return path, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_mmengine_checkpoint(tmp_path):
    pytest.importorskip("mmengine.optim")  # mmengine is not a test extra (its Runner needs OpenCV)
    from mmengine.optim import OptimWrapper
    from mmengine.optim.scheduler import CosineAnnealingLR, LinearLR

    a, _ = _mmengine_run(tmp_path, 2, "iter_2")
    b, uninterrupted = _mmengine_run(tmp_path, 3, "iter_3")
    code, rep = invoke_json("inspect", str(b))
    assert code == 0 and len(rep["schedulers"]) == 2 and rep["extras"]["meta.iter"] == 3
    code, rep = invoke_json("diff", str(a), str(b), "--only", "scheduler", "--only", "extra")
    assert code == 1
    changed = {(e["section"], e["name"], e["key"]) for e in rep["entries"]}
    assert ("extra", "extras", "meta.iter") in changed and ("scheduler", "param_schedulers[1]", "last_step") in changed
    out = tmp_path / "remapped.pth"
    r = invoke("remap", str(b), "--target", TARGET, "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    # Runner.resume: load the checkpoint, then optim_wrapper / schedulers / message_hub load_state_dict
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    model = models.SmallCNNHeadFirst()
    model.load_state_dict(ckpt["state_dict"])
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    scheds = [LinearLR(wrapper, start_factor=0.1, by_epoch=False, begin=0, end=2),  # built before the resume
              CosineAnnealingLR(wrapper, T_max=4, by_epoch=False, begin=2, end=6)]
    wrapper.load_state_dict(ckpt["optimizer"])
    for s, sd in zip(scheds, ckpt["param_schedulers"]):
        s.load_state_dict(sd)
    assert ckpt["message_hub"]["runtime_info"]["iter"] == 3
    x, y = _data()
    wrapper.update_params(torch.nn.functional.cross_entropy(model(x), y))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), uninterrupted[n], atol=1e-6, rtol=0)
