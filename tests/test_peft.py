"""A real transformers Trainer + PEFT LoRA checkpoint (``checkpoint-N/`` with ``adapter_model.safetensors``,
keys without the adapter name, an empty no-decay group): unchanged code checks SAFE without ``--source``,
remap keeps every saved group's hyperparameters, and what the adapter config cannot vouch for stays uncertain."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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


# --- an adapter whose config names no base model (get_peft_model on a model built from a config) ---

NOBASE_TARGET = '''
from collections import OrderedDict

import peft, torch, transformers


def config():
    cfg = transformers.AutoConfig.from_pretrained({config_dir!r})
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    cfg._name_or_path = ""  # built from a config: peft then records base_model_name_or_path null
    return cfg


class MlpFirst(transformers.GPT2LMHeadModel):
    """Each block registers mlp before attn (the forward is unchanged: the LoRA parameters' order changes)."""

    def __init__(self, config):
        super().__init__(config)
        for block in self.transformer.h:
            block._modules = OrderedDict(sorted(block._modules.items(), key=lambda kv: kv[0] != "mlp"))


def groups(model):  # the decay / no-decay groups transformers.Trainer builds
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    return [{{"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
              "weight_decay": 0.01}},
            {{"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
              "weight_decay": 0.0}}]


def lora(model, adapter_name="default"):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["c_attn", "c_proj"]), adapter_name=adapter_name)


def build():
    torch.manual_seed(0)
    model = lora(transformers.GPT2LMHeadModel(config()))
    return model, torch.optim.AdamW(groups(model), lr=1e-3)


def mlp_first():
    torch.manual_seed(0)
    model = lora(MlpFirst(config()))
    return model, torch.optim.AdamW(groups(model), lr=1e-3)


def other_adapter_name():
    model = lora(transformers.GPT2LMHeadModel(config()), "mine")
    return model, torch.optim.AdamW(groups(model), lr=1e-3)
'''


def _nobase_train(model, outdir, *, steps, resume=None):
    args = transformers.TrainingArguments(
        output_dir=str(outdir), max_steps=steps, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-3, optim="adamw_torch", weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=1,
        max_grad_norm=0.0, report_to=[], use_cpu=True, seed=0, data_seed=0, full_determinism=True,
        disable_tqdm=True, logging_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=RandomTokens()).train(
        resume_from_checkpoint=str(resume) if resume else None)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def nobase_run(tmp_path_factory):
    """LoRA on a GPT-2 built from a config, 3 Trainer steps saving checkpoint-2/ on the way; the
    trainable parameters after step 3 are the uninterrupted reference."""
    import importlib.util

    root = tmp_path_factory.mktemp("peft_nobase")
    (root / "target.py").write_text(NOBASE_TARGET.format(
        config_dir=str(Path(__file__).resolve().parent.parent / "fixtures" / "hf_trainer" / "checkpoint-3")))
    spec = importlib.util.spec_from_file_location("peft_nobase_target", root / "target.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    model, _ = code.build()
    ref = _nobase_train(model, root / "out", steps=3)
    return root, root / "out" / "checkpoint-2", code, ref


def test_no_base_model_path_is_what_the_issue_describes(nobase_run):
    _, ckpt, _, _ = nobase_run
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_no_base_model_path_unchanged_code_is_safe_without_source(nobase_run):
    """Names from the target's live adapter names (``.default.`` bridged to the file's keys), order from
    the registered class the adapter config records, with the target's config."""
    root, ckpt, _, _ = nobase_run
    code, out = invoke_json("check", str(ckpt), "--target", f"{root / 'target.py'}:build")
    assert code == 0, out
    assert out["verdict"] == "safe" and out["counts"]["ok"] == 12 and out["evidence_counts"] == {"model-order": 12}
    assert all(".default." in e["name"] for e in out["params"])


@pytest.mark.slow
def test_no_base_model_path_unchanged_code_is_safe_in_a_subprocess(nobase_run):
    """The same check as a real subprocess run (transformers and peft imported afresh)."""
    from conftest import run_cli

    root, ckpt, _, _ = nobase_run
    r = run_cli("check", str(ckpt), "--target", f"{root / 'target.py'}:build", "--format", "json", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["verdict"] == "safe" and out["counts"]["ok"] == 12 and out["evidence_counts"] == {"model-order": 12}
    assert all(".default." in e["name"] for e in out["params"])


def test_no_base_model_path_another_live_adapter_name_is_bridged(nobase_run):
    root, ckpt, _, _ = nobase_run
    code, out = invoke_json("check", str(ckpt), "--target", f"{root / 'target.py'}:other_adapter_name")
    assert code == 0, out
    assert out["verdict"] == "safe" and all(".lora_A.mine." in e["name"] or ".lora_B.mine." in e["name"]
                                            for e in out["params"])


def test_no_base_model_path_a_reordering_target_is_not_passed_off_as_the_saved_order(nobase_run, tmp_path):
    """The target registers mlp before attn in every block: its own order is not the saved one. The
    order comes from the adapter config's registered class, so check reports the moves, remap fixes
    them, and the Trainer's own resume of the repaired checkpoint continues the uninterrupted run."""
    root, ckpt, code, ref = nobase_run
    spec = f"{root / 'target.py'}:mlp_first"
    rc, out = invoke_json("check", str(ckpt), "--target", spec)
    assert rc == 1 and out["verdict"] != "safe", out
    assert out["counts"]["moved"] == 12 and out["counts"]["ambiguous"] == 0 and out["counts"]["missing"] == 0
    r = invoke("remap", str(ckpt), "--target", spec, "-o", str(tmp_path / "fixed"))
    assert r.exit_code == 0, r.stdout + r.stderr
    rc, out = invoke_json("check", str(tmp_path / "fixed"), "--target", spec)
    assert rc == 0 and out["verdict"] == "safe", out
    model, _ = code.mlp_first()
    got = _nobase_train(model, tmp_path / "resumed", steps=3, resume=tmp_path / "fixed")
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    model, _ = code.mlp_first()  # the same resume of the unrepaired checkpoint: another parameter's state
    with pytest.raises(RuntimeError, match="must match the size"):  # Adam meets a (4, 64) state on (4, 16)
        _nobase_train(model, tmp_path / "unrepaired", steps=3, resume=ckpt)


def test_no_base_model_path_a_target_that_is_not_peft_keeps_the_names_uncertain(nobase_run, monkeypatch):
    root, ckpt, _, _ = nobase_run
    monkeypatch.chdir(root)  # the target is given as module:callable, imported from the current directory
    (root / "plain.py").write_text("import transformers\nfrom target import config\n"
                                   "def build():\n    return transformers.GPT2LMHeadModel(config())\n")
    r = invoke("check", str(ckpt), "--target", "plain:build")
    assert r.exit_code == 1, r.stdout
    assert "names no base model, and the target's config cannot stand in for it: the target is not a PeftModel" \
        in r.stdout
