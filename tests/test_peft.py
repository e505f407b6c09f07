"""A real transformers Trainer + PEFT LoRA checkpoint (``checkpoint-N/`` with ``adapter_model.safetensors``,
keys without the adapter name, an empty no-decay group): unchanged code checks SAFE without ``--source``,
remap keeps every saved group's hyperparameters, and what the adapter config cannot vouch for stays uncertain."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import invoke, invoke_json  # noqa: E402
from test_integrations_transformers import RandomTokens, _config  # noqa: E402

TARGET = '''
import peft, torch, transformers
import real_targets

def build(target_modules=("c_attn", "c_proj")):
    model = transformers.GPT2LMHeadModel.from_pretrained({base!r})
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=list(target_modules)))
    return model, torch.optim.AdamW(real_targets.trainer_groups(model), lr=1e-3)

def attn_only():
    return build(("c_attn",))
'''


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A base GPT-2 saved locally and loaded back (as a user fine-tunes a local model), LoRA on c_attn and
    c_proj, 2 Trainer steps saving checkpoint-2/; and the target code, unchanged."""
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(_config()).save_pretrained(root / "base")
    model, _ = _build(root / "base")
    args = transformers.TrainingArguments(
        output_dir=str(root / "out"), max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-3, optim="adamw_torch", weight_decay=0.01, report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens())
    trainer.train()
    (root / "target.py").write_text(TARGET.format(base=str(root / "base")))
    return root, root / "out" / "checkpoint-2"


def _build(base):
    model = transformers.GPT2LMHeadModel.from_pretrained(str(base))
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["c_attn", "c_proj"])), None


def test_the_checkpoint_is_what_the_issue_describes(lora_run):
    _, ckpt = lora_run
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in saved["param_groups"]] == [12, 0]
    with open(ckpt / "adapter_model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert all(".default." not in k for k in header) and any(k.endswith("lora_A.weight") for k in header)


def test_check_on_unchanged_code_is_safe_without_source(lora_run):
    root, ckpt = lora_run
    code, out = invoke_json("check", str(ckpt), "--target", f"{root / 'target.py'}:build")
    assert code == 0, out
    assert out["verdict"] == "safe" and out["counts"]["ok"] == 12 and out["groups"]["source"] == [12, 0]
    assert out["evidence_counts"] == {"model-order": 12}
    assert all(".lora_A.default." in e["name"] or ".lora_B.default." in e["name"] for e in out["params"])


def test_changed_adapter_targets_are_not_called_safe(lora_run):
    root, ckpt = lora_run
    r = invoke("check", str(ckpt), "--target", f"{root / 'target.py'}:attn_only")
    assert r.exit_code == 1, r.stdout
    assert "mlp.c_proj.lora_A.default.weight" in r.stdout


def test_remap_keeps_every_saved_groups_hyperparameters(lora_run, tmp_path):
    root, ckpt = lora_run
    r = invoke("remap", str(ckpt), "--target", f"{root / 'target.py'}:build", "-o", str(tmp_path / "out"))
    assert r.exit_code == 0, r.stdout
    old = torch.load(ckpt / "optimizer.pt", weights_only=True)
    new = torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in new["param_groups"]] == [12, 0]
    for g, h in zip(old["param_groups"], new["param_groups"]):
        assert {k: v for k, v in g.items() if k != "params"} == \
            {k: v for k, v in h.items() if k not in ("params", "param_names")}
    assert old["param_groups"][1]["lr"] == new["param_groups"][1]["lr"]
    assert "initial_lr" in new["param_groups"][1]
    for i, st in old["state"].items():
        assert torch.equal(st["exp_avg_sq"], new["state"][i]["exp_avg_sq"])


def test_without_the_base_models_config_names_stay_uncertain(lora_run, tmp_path):
    root, ckpt = lora_run
    moved = tmp_path / "ckpt"
    shutil.copytree(ckpt, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "nowhere")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    r = invoke("check", str(moved), "--target", f"{root / 'target.py'}:build")
    assert r.exit_code != 0
    assert "PEFT adapter names and order unknown" in r.stdout and "not available locally" in r.stdout


def _with_config(ckpt, dst, **changes):
    shutil.copytree(ckpt, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_a_hub_id_not_in_the_cache_makes_no_network_lookup(lora_run, tmp_path, monkeypatch):
    """base_model_name_or_path "gpt2" (a hub id, not cached here): huggingface_hub reached the network
    even with local_files_only=True. Every name resolution is recorded and refused: none happens, the
    note says the id is not in the local cache, and the offline switches are restored afterwards."""
    import socket

    import huggingface_hub.constants as hub_constants

    root, ckpt = lora_run
    moved = _with_config(ckpt, tmp_path / "ckpt", base_model_name_or_path="gpt2")
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    lookups = []

    def record(host, *args, **kwargs):
        lookups.append(host)
        raise OSError(f"test: no network lookups allowed ({host})")

    monkeypatch.setattr(socket, "getaddrinfo", record)
    r = invoke("check", str(moved), "--target", f"{root / 'target.py'}:build")
    assert lookups == []
    assert "PEFT adapter names and order unknown" in r.stdout and "not in the local Hugging Face cache" in r.stdout
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
    assert hub_constants.HF_HUB_OFFLINE is False


@pytest.mark.parametrize("name", ["pipeline", "Trainer", "AutoModel", "set_seed", "os.system", "PreTrainedModel"])
def test_a_hostile_base_model_class_is_never_called(lora_run, tmp_path, monkeypatch, name):
    root, ckpt = lora_run
    moved = _with_config(ckpt, tmp_path / "ckpt",
                         auto_mapping={"base_model_class": name, "parent_library": "transformers.models"})
    called = []
    if name == "Trainer":  # the test's own target uses Trainer's methods: record constructions instead
        monkeypatch.setattr(transformers.Trainer, "__init__", lambda *a, **k: called.append(a))
    elif hasattr(transformers, name):
        monkeypatch.setattr(transformers, name, lambda *a, **k: called.append(a))
    r = invoke("check", str(moved), "--target", f"{root / 'target.py'}:build")
    assert called == []
    assert "PEFT adapter names and order unknown" in r.stdout, r.stdout + r.stderr
    assert "refused" in r.stdout or "not a model class name" in r.stdout, r.stdout


def test_a_registered_base_model_class_still_rebuilds(lora_run, tmp_path):
    root, ckpt = lora_run
    moved = _with_config(ckpt, tmp_path / "ckpt", auto_mapping={"base_model_class": "GPT2LMHeadModel"})
    code, rep = invoke_json("check", str(moved), "--target", f"{root / 'target.py'}:build")
    assert code == 0, rep
