"""``diff`` on files holding several model state dicts (timm's ``state_dict`` + ``state_dict_ema``):
every model entry says which model it belongs to; a file with one model keeps plain names."""

from __future__ import annotations

import copy

import torch
from conftest import invoke, invoke_json
from torch import nn


def _train_and_save(path, steps):
    """Real training with an EMA copy, saved as timm's CheckpointSaver lays it out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 4)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 0.5)
    torch.save({"epoch": steps, "arch": "mlp", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                "version": 2, "state_dict_ema": ema.state_dict()}, path)


def test_model_entries_are_qualified_by_their_model(tmp_path):
    _train_and_save(tmp_path / "a.pth.tar", 2)
    _train_and_save(tmp_path / "b.pth.tar", 3)
    code, out = invoke_json("diff", str(tmp_path / "a.pth.tar"), str(tmp_path / "b.pth.tar"))
    assert code == 1, out
    names = [e["name"] for e in out["entries"] if e["section"] == "model"]
    assert len(names) == len(set(names)) == 8  # 4 tensors in each model, all changed, none listed twice
    assert {n.split(":", 1)[0] for n in names} == {"state_dict", "state_dict_ema"}
    assert "state_dict_ema:0.weight" in names and "state_dict:2.bias" in names
    text = invoke("diff", str(tmp_path / "a.pth.tar"), str(tmp_path / "b.pth.tar")).stdout
    assert "state_dict_ema:0.weight" in text and "state_dict:0.weight" in text


def test_only_the_ema_model_changed(tmp_path):
    _train_and_save(tmp_path / "a.pth.tar", 2)
    ck = torch.load(tmp_path / "a.pth.tar", weights_only=True)
    ck["state_dict_ema"]["2.bias"] = ck["state_dict_ema"]["2.bias"] + 1.0
    torch.save(ck, tmp_path / "b.pth.tar")
    code, out = invoke_json("diff", str(tmp_path / "a.pth.tar"), str(tmp_path / "b.pth.tar"))
    assert code == 1
    assert [(e["section"], e["name"], e["status"]) for e in out["entries"]] == \
        [("model", "state_dict_ema:2.bias", "changed")]


def test_a_single_model_keeps_plain_names(tmp_path):
    _train_and_save(tmp_path / "a.pth.tar", 2)
    _train_and_save(tmp_path / "b.pth.tar", 3)
    for p in ("a.pth.tar", "b.pth.tar"):
        ck = torch.load(tmp_path / p, weights_only=True)
        del ck["state_dict_ema"]
        torch.save(ck, tmp_path / p)
    _, out = invoke_json("diff", str(tmp_path / "a.pth.tar"), str(tmp_path / "b.pth.tar"))
    assert sorted(e["name"] for e in out["entries"] if e["section"] == "model") == \
        ["0.bias", "0.weight", "2.bias", "2.weight"]
