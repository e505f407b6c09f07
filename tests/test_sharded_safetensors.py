"""``convert --to safetensors --max-shard-size``: Hugging Face's sharded layout, read back by
transformers' own ``from_pretrained`` on the local directory."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import invoke, run_cli

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _from_pretrained(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel.from_pretrained(str(path)).eval()


def test_sharded_output_loads_with_from_pretrained(tmp_path):
    model = _gpt2()
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "ckpt.pt")
    out = tmp_path / "hf"
    r = run_cli("convert", str(tmp_path / "ckpt.pt"), "--to", "safetensors", "--max-shard-size", "40KB",
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(files)
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in files:  # every shard within the limit unless one tensor alone exceeds it
        names = [k for k, v in index["weight_map"].items() if v == f]
        data = sum(tensors[k].numel() * tensors[k].element_size() for k in names)
        assert data <= 40_000 or len(names) == 1
    model.config.save_pretrained(out)
    loaded = _from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.arange(8).unsqueeze(0)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    r = invoke("diff", str(tmp_path / "ckpt.pt"), str(out), "--only", "model", "--format", "json")
    assert [(e["name"], e["status"]) for e in json.loads(r.stdout)["entries"]] == [("lm_head.weight", "removed")]


def test_one_shard_is_model_safetensors_and_dcp_input(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = _gpt2()
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    r = invoke("convert", str(tmp_path / "dcp"), "--to", "safetensors", "--max-shard-size", "1GiB",
               "-o", str(tmp_path / "one"))
    assert r.exit_code == 0, r.stderr
    assert os.listdir(tmp_path / "one") == ["model.safetensors"]
    r = invoke("convert", str(tmp_path / "dcp"), "--to", "safetensors", "--max-shard-size", "30000",
               "-o", str(tmp_path / "many"))
    assert r.exit_code == 0, r.stderr
    for out in ("one", "many"):
        model.config.save_pretrained(tmp_path / out)
        loaded = _from_pretrained(tmp_path / out)
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (out, k)


@pytest.mark.parametrize("args", [["--to", "safetensors", "--max-shard-size", "lots"],
                                  ["--to", "safetensors", "--max-shard-size", "0"],
                                  ["--to", "torch", "--max-shard-size", "5GB"]])
def test_bad_sizes_are_one_line_errors(tmp_path, args):
    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "c.pt")
    r = invoke("convert", str(tmp_path / "c.pt"), *args, "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()
