"""transformers Trainer: train, save ``checkpoint-N/``, change the model (reorder + a new layer),
resume with ``train(resume_from_checkpoint=...)`` through the by-name Trainer, and match the
uninterrupted run by name."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import real_targets  # noqa: E402  (tests/, on sys.path as the test directory)

from optckpt import MappingError  # noqa: E402
from optckpt.integrations.transformers import ResumeByNameTrainer  # noqa: E402


def _config():
    cfg = real_targets.hf_config()
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return cfg


def _changed_class():
    """GPT-2 with ``ln_f`` and ``wpe`` registered first, plus a new head trained on detached hidden
    states (the old parameters' gradients are unchanged)."""
    base = real_targets.gpt2_reordered_class()

    class GPT2Changed(base):  # type: ignore[misc, valid-type]
        def __init__(self, config):
            super().__init__(config)
            self.aux = nn.Linear(config.n_embd, 2)

        def forward(self, input_ids=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, labels=labels, output_hidden_states=True, **kwargs)
            out.loss = out.loss + self.aux(out.hidden_states[-1].detach()).pow(2).mean()
            return out

    return GPT2Changed


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=8):
        self.ids = torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _train(model, outdir, *, resume=None, trainer_cls=None, save=False, **trainer_kwargs):
    # max_grad_norm=0: clipping by the global norm would couple the new layer to the old parameters
    args = transformers.TrainingArguments(
        output_dir=str(outdir), max_steps=4, save_strategy="steps" if save else "no", save_steps=2,
        per_device_train_batch_size=2, learning_rate=1e-3, optim="adamw_torch", weight_decay=0.01,
        lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=0.0, report_to=[], eval_strategy="no",
        dataloader_num_workers=0, use_cpu=True, seed=0, data_seed=0, full_determinism=True, disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = (trainer_cls or transformers.Trainer)(model=model, args=args, train_dataset=RandomTokens(),
                                                    **trainer_kwargs)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    assert trainer.state.global_step == 4
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def _assert_same_by_name(got, ref):
    assert set(ref) <= set(got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A plain Trainer run of 4 steps that saved checkpoint-2/ (no param_names) on the way."""
    out = tmp_path_factory.mktemp("hf") / "run"
    torch.manual_seed(0)
    ref, _ = _train(transformers.GPT2LMHeadModel(_config()), out, save=True)
    return out / "checkpoint-2", ref


def test_resume_changed_model_by_name_matches_uninterrupted(plain_run, tmp_path, caplog):
    ckpt, ref = plain_run
    groups = torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]
    assert all("param_names" not in g for g in groups)
    transformers.utils.logging.enable_propagation()
    with caplog.at_level(logging.INFO, logger="transformers.trainer.optckpt"):
        got, trainer = _train(_changed_class()(_config()), tmp_path / "b", resume=ckpt, trainer_cls=ResumeByNameTrainer)
    _assert_same_by_name(got, ref)
    report = trainer.optckpt_hook.report
    assert report is not None and report.evidence == "model-order"  # from config.json, rebuilt on meta
    assert report.moved and sorted(report.missing) == ["aux.bias", "aux.weight"]
    assert not (report.unexpected or report.ambiguous or report.shape_mismatch)
    ours = {(r.levelno, r.getMessage()) for r in caplog.records if r.name == "transformers.trainer.optckpt"}
    assert len(ours) == 1 and all(level == logging.WARNING and "missing ['aux" in msg for level, msg in ours)


def test_without_the_integration_the_same_resume_crashes_or_diverges(plain_run, tmp_path):
    ckpt, ref = plain_run
    try:
        got, _ = _train(_changed_class()(_config()), tmp_path / "b", resume=ckpt)
    except (ValueError, RuntimeError):
        return
    assert any(not torch.allclose(got[n], ref[n], atol=1e-6) for n in ref)


def test_checkpoints_saved_by_it_carry_param_names_and_resume_exactly(tmp_path):
    torch.manual_seed(0)
    ref, _ = _train(transformers.GPT2LMHeadModel(_config()), tmp_path / "a", save=True,
                    trainer_cls=ResumeByNameTrainer)
    ckpt = tmp_path / "a" / "checkpoint-2"
    groups = torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]
    assert all(g["param_names"] for g in groups) and "transformer.wte.weight" in groups[0]["param_names"]
    (ckpt / "config.json").unlink()  # no order evidence needed: the names are saved
    got, trainer = _train(_changed_class()(_config()), tmp_path / "b", resume=ckpt, trainer_cls=ResumeByNameTrainer)
    _assert_same_by_name(got, ref)
    assert trainer.optckpt_hook.report.evidence == "param_names"


def test_without_order_evidence_it_refuses_unless_allowed(plain_run, tmp_path):
    """config.json naming an architecture transformers lacks: the safetensors order is sorted, so
    the saved state of same-shape parameters cannot be named."""
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(plain_run[0], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["NotInTransformers"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MappingError, match="allow_ambiguous"):
        _train(_changed_class()(_config()), tmp_path / "b", resume=ckpt, trainer_cls=ResumeByNameTrainer)
    _, trainer = _train(_changed_class()(_config()), tmp_path / "c", resume=ckpt, trainer_cls=ResumeByNameTrainer,
                        allow_ambiguous=True)
    assert trainer.optckpt_hook.report.ambiguous
