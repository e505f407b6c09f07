"""Checkpoints written by transformers / accelerate / Lightning, repaired by ``optckpt remap`` for a
reordered model, resume through each library's own resume path exactly like the uninterrupted run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, ROOT, invoke

TARGETS = str(ROOT / "tests" / "real_targets.py")
REAL = str(FIXTURES / "real_models.py")


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


# --- accelerate ----------------------------------------------------------------------------------

def _accelerate_one_step(model, state_dir):
    accelerate = pytest.importorskip("accelerate")
    import real_models
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    acc = accelerate.Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = real_models.synthetic_tinynet_data()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    acc.load_state(str(state_dir))
    xb, yb = x[12:16], y[12:16]
    loss = torch.nn.functional.cross_entropy(model(xb), yb)
    acc.backward(loss)
    opt.step()
    sched.step()
    return _params(acc.unwrap_model(model)), sched.get_last_lr()


def test_accelerate_save_state_remapped_resumes(tmp_path):
    pytest.importorskip("accelerate")
    import real_models

    out = tmp_path / "state"
    r = invoke("remap", str(FIXTURES / "accelerate" / "state"), "--target", f"{REAL}:build_tinynet_reordered",
               "--source", f"{REAL}:build_tinynet", "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    # opaque parts are copied byte for byte
    for name in ("random_states_0.pkl", "model.safetensors"):
        assert (out / name).read_bytes() == (FIXTURES / "accelerate" / "state" / name).read_bytes()
    ref, ref_lr = _accelerate_one_step(real_models.build_tinynet(), FIXTURES / "accelerate" / "state")
    got, got_lr = _accelerate_one_step(real_models.build_tinynet_reordered(), out)
    _assert_same(got, ref)
    assert got_lr == ref_lr


def test_accelerate_without_source_refuses_to_guess(tmp_path):
    r = invoke("remap", str(FIXTURES / "accelerate" / "state"), "--target", f"{REAL}:build_tinynet_reordered",
               "-o", str(tmp_path / "state"))
    assert r.exit_code == 2 and "uncertain" in r.stderr and "--source" in r.stderr
    assert not (tmp_path / "state").exists()


# --- Lightning -----------------------------------------------------------------------------------

def _lightning_resume(module, ckpt, root):
    pl = pytest.importorskip("pytorch_lightning")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, deterministic=True,
                         default_root_dir=str(root))
    trainer.fit(module, ckpt_path=str(ckpt))
    assert trainer.global_step == 4
    return _params(module)


def test_lightning_ckpt_remapped_resumes(tmp_path):
    pytest.importorskip("pytorch_lightning")
    import real_models
    import real_targets

    out = tmp_path / "fixed.ckpt"
    r = invoke("remap", str(FIXTURES / "lightning" / "last.ckpt"), "--target", f"{TARGETS}:tinylit_reordered",
               "-o", str(out), "--format", "json")
    assert r.exit_code == 0, r.stdout + r.stderr
    plan = json.loads(r.stdout)
    assert plan["summary"]["move"] > 0 and plan["summary"]["reset"] == 0
    before = torch.load(FIXTURES / "lightning" / "last.ckpt", weights_only=True)
    after = torch.load(out, weights_only=True)
    for key in ("state_dict", "loops", "callbacks", "epoch", "global_step", "hyper_parameters"):
        assert repr(after[key]) == repr(before[key])  # every other top-level key untouched
    ref = _lightning_resume(real_models.TinyLit(), FIXTURES / "lightning" / "last.ckpt", tmp_path / "a")
    got = _lightning_resume(real_targets.tinylit_reordered(), out, tmp_path / "b")
    _assert_same(got, ref)


# --- transformers Trainer ------------------------------------------------------------------------

def _hf_resume(model, checkpoint, outdir):
    transformers = pytest.importorskip("transformers")

    class RandomTokens(torch.utils.data.Dataset):
        def __init__(self, n=16, seq=8, seed=1):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(0, 64, (n, seq), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}

    args = transformers.TrainingArguments(
        output_dir=str(outdir), max_steps=4, save_strategy="no", per_device_train_batch_size=2,
        learning_rate=1e-3, optim="adamw_torch", weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=1,
        report_to=[], eval_strategy="no", dataloader_num_workers=0, use_cpu=True, seed=0, data_seed=0,
        full_determinism=True, disable_tqdm=True, logging_strategy="no",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    return _params(model)


def test_hf_trainer_check_is_safe_for_same_architecture():
    pytest.importorskip("transformers")
    r = invoke("check", str(FIXTURES / "hf_trainer" / "checkpoint-3"), "--target",
               str(FIXTURES / "hf_trainer" / "checkpoint-3"), "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["safe"], r.stdout


def test_hf_trainer_remapped_resumes(tmp_path):
    transformers = pytest.importorskip("transformers")
    import real_targets

    src = FIXTURES / "hf_trainer" / "checkpoint-3"
    r = invoke("check", str(src), "--target", f"{TARGETS}:gpt2_reordered_with_trainer_optimizer",
               "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and rep["counts"]["ambiguous"] == 0 and rep["counts"]["moved"] > 0
    out = tmp_path / "checkpoint-3"
    r = invoke("remap", str(src), "--target", f"{TARGETS}:gpt2_reordered_with_trainer_optimizer", "-o", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    for name in ("training_args.bin", "rng_state.pth", "model.safetensors", "trainer_state.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    cfg = real_targets.hf_config()
    torch.manual_seed(0)
    ref = _hf_resume(transformers.GPT2LMHeadModel(cfg), src, tmp_path / "run_a")
    torch.manual_seed(0)
    got = _hf_resume(real_targets.gpt2_reordered_class()(cfg), out, tmp_path / "run_b")
    _assert_same(got, ref)


def test_hf_without_order_evidence_is_honest(tmp_path, monkeypatch):
    """With config.json gone (a custom architecture, or transformers missing) nothing is guessed
    from the safetensors key order."""
    d = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    (d / "config.json").unlink()
    (d / "generation_config.json").unlink()
    r = invoke("check", str(d), "--target", str(FIXTURES / "hf_trainer" / "checkpoint-3"), "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and not rep["safe"] and rep["counts"]["ambiguous"] > 0
    assert any("--source" in n for n in rep["notes"])


def test_controls_unrepaired_resume_breaks(tmp_path):
    """Without the repair the same resumes crash or diverge: the tests above can fail."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("pytorch_lightning")
    import real_models
    import real_targets

    cfg = real_targets.hf_config()
    src = FIXTURES / "hf_trainer" / "checkpoint-3"
    ref = _hf_resume(transformers.GPT2LMHeadModel(cfg), src, tmp_path / "a")
    try:
        got = _hf_resume(real_targets.gpt2_reordered_class()(cfg), src, tmp_path / "b")
        assert any(not torch.allclose(got[n], ref[n], atol=1e-6) for n in ref)
    except RuntimeError:
        pass
    with pytest.raises(RuntimeError):
        _lightning_resume(real_targets.tinylit_reordered(), FIXTURES / "lightning" / "last.ckpt", tmp_path / "c")
    assert real_models.TinyLit  # the reference module class exists


def test_hf_without_transformers_guesses_nothing(monkeypatch, tmp_path):
    """transformers missing: no name from the safetensors order, a hint instead; --source is exact."""
    import sys

    pytest.importorskip("transformers")
    import optckpt
    from optckpt.mapping import infer_mapping

    src = str(FIXTURES / "hf_trainer" / "checkpoint-3")
    truth = infer_mapping(optckpt.load(src))  # with transformers: exact
    names = tmp_path / "names.json"
    groups: list[list[str]] = [[], []]
    for e in truth.entries:
        groups[e.group].append(e.name)
    names.write_text(json.dumps(groups))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    r = invoke("check", src, "--target", str(names), "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and rep["evidence"] == "shapes-only" and rep["counts"]["ambiguous"] > 0
    assert any("install transformers" in n for n in rep["notes"])
    named = [p for p in rep["params"] if p["status"] != "ambiguous"]
    assert all(p["status"] == "ok" for p in named)  # whatever is named is right
    r = invoke("check", src, "--target", str(names), "--source", str(names), "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["safe"]


def test_hf_custom_code_is_not_run_without_trust(tmp_path):
    pytest.importorskip("transformers")
    d = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "PWNED"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    r = invoke("inspect", str(d), "--format", "json")
    assert r.exit_code == 0
    rep = json.loads(r.stdout)
    assert any("auto_map" in n for n in rep["notes"])
    assert rep["optimizers"][0]["name_evidence"] == "shapes-only"
    assert not marker.exists()
