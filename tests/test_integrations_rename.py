"""One contract for the CLI, the API and the integrations: ``rename`` (``--rename`` syntax or a mapping).

Each test trains, saves with the library, renames a submodule (``head`` -> ``classifier``), resumes
through the API or the library's integration with ``rename=["head.=classifier."]``, and compares the
resumed run with the uninterrupted one parameter by parameter (by name, the renamed ones mapped)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optckpt


class Small(nn.Module):
    def __init__(self, head: str = "head"):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        setattr(self, head, nn.Linear(8, 4))
        self.head_name = head

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_name)(torch.relu(self.body(self.embed(x))).mean(dim=1))

    def forward(self, input_ids=None, labels=None, **_):
        out = self.logits(input_ids)
        return {"loss": nn.functional.cross_entropy(out, labels), "logits": out}


def _data(n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 16, (n, 5), generator=g), torch.randint(0, 4, (n,), generator=g)


def _groups(model: nn.Module) -> list[dict]:
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]


def _old(name: str) -> str:
    return name.replace("classifier.", "head.")


def _assert_same_by_name(new: nn.Module, ref: dict[str, torch.Tensor]) -> None:
    got = {_old(n): p.detach() for n, p in new.named_parameters()}
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


# --- the API ---------------------------------------------------------------------------------------

def _step(model: Small, opt: torch.optim.Optimizer, i: int) -> None:
    x, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(model.logits(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]).backward()
    opt.step()


@pytest.mark.parametrize("rename", [["head.=classifier."], {"head.": "classifier."}], ids=["strings", "mapping"])
def test_api_rename_resumes_exactly(tmp_path, rename):
    model = Small()
    opt = torch.optim.AdamW(_groups(model), lr=1e-2)
    for i in range(2):
        _step(model, opt, i)
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    _step(model, opt, 2)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}

    new = Small("classifier")
    sd = torch.load(path, weights_only=True)
    new.load_state_dict({k.replace("head.", "classifier."): v for k, v in sd["model"].items()})
    new_opt = torch.optim.AdamW(_groups(new), lr=1e-2)
    report = optckpt.load_optimizer_state_dict(new_opt, new, path, rename=rename)
    assert not report.missing and not report.unexpected
    _step(new, new_opt, 2)
    _assert_same_by_name(new, ref)


def test_api_without_rename_drops_the_renamed_state_and_says_so(tmp_path):
    model = Small()
    opt = torch.optim.AdamW(_groups(model), lr=1e-2)
    _step(model, opt, 0)
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    new = Small("classifier")
    report = optckpt.load_optimizer_state_dict(torch.optim.AdamW(_groups(new), lr=1e-2), new, path)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]  # hints are never applied unasked
    assert sorted(report.unexpected) == ["head.bias", "head.weight"]


def test_a_bad_rename_is_one_clear_error(tmp_path):
    new = Small("classifier")
    with pytest.raises(optckpt.OptckptError, match="OLD=NEW"):
        optckpt.load_optimizer_state_dict(torch.optim.AdamW(new.parameters()), new, {"state": {}, "param_groups": []},
                                          rename=["head.classifier."])


# --- Lightning -------------------------------------------------------------------------------------

def test_lightning_callback_rename(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from optckpt.integrations.lightning import LoadOptimizerByName

    class Lit(pl.LightningModule):
        def __init__(self, head: str = "head"):
            super().__init__()
            self.net = Small(head)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net.logits(x), y)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=4, shuffle=False)

        def configure_optimizers(self):
            return torch.optim.AdamW(_groups(self), lr=1e-2)

    def fit(module, root, epochs, ckpt=None, callbacks=()):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, deterministic=True,
                             default_root_dir=str(root), callbacks=list(callbacks))
        trainer.fit(module, ckpt_path=str(ckpt) if ckpt else None)
        return trainer

    ref_module = Lit()
    fit(ref_module, tmp_path / "ref", 2)
    ref = {n: p.detach().clone() for n, p in ref_module.named_parameters()}
    trainer = fit(Lit(), tmp_path / "first", 1)  # a plain Lightning checkpoint: no param_names
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(str(ckpt))

    callback = LoadOptimizerByName(rename=["net.head.=net.classifier."])
    new = Lit("classifier")
    fit(new, tmp_path / "resumed", 2, ckpt=ckpt, callbacks=[callback])
    _assert_same_by_name(new, ref)
    assert callback.report is not None and callback.report is callback.hooks[0].report
    assert not callback.report.missing and not callback.report.unexpected
    assert callback.reports == [callback.report]


# --- accelerate ------------------------------------------------------------------------------------

def test_accelerate_rename(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from optckpt.integrations.accelerate import load_optimizers_by_name

    def run(model, steps, *, save_at=None, save_dir=None, resume=None, rename=()):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
        acc = accelerate.Accelerator(cpu=True)
        hooks = load_optimizers_by_name(acc, rename=rename)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2)
        model, opt = acc.prepare(model, opt)
        start = 0
        if resume is not None:
            acc.load_state(str(resume))  # strict: the renamed weights must reach the renamed module
            start = save_at
        x, y = _data()
        for step in range(start, steps):
            acc.backward(nn.functional.cross_entropy(acc.unwrap_model(model).logits(x[4 * step:4 * step + 4]),
                                                     y[4 * step:4 * step + 4]))
            opt.step()
            opt.zero_grad()
            if step + 1 == save_at and save_dir is not None:
                acc.save_state(str(save_dir))
        return {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()}, hooks

    ref, _ = run(Small(), 3)
    run(Small(), 2, save_at=2, save_dir=tmp_path / "state")  # saved through the integration: param_names
    new = Small("classifier")
    got, hooks = run(new, 3, save_at=2, resume=tmp_path / "state", rename={"head.": "classifier."})
    _assert_same_by_name(new, ref)
    assert hooks and hooks[0].report is not None and not hooks[0].report.missing


# --- transformers Trainer --------------------------------------------------------------------------

def test_trainer_rename(tmp_path):
    transformers = pytest.importorskip("transformers")
    from optckpt.integrations.transformers import ResumeByNameTrainer

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = _data()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.y[i]}

    def train(model, outdir, *, resume=None, save=False, **kw):
        args = transformers.TrainingArguments(
            output_dir=str(outdir), max_steps=4, save_strategy="steps" if save else "no", save_steps=2,
            per_device_train_batch_size=4, learning_rate=1e-2, optim="adamw_torch", weight_decay=0.01,
            lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], eval_strategy="no",
            dataloader_num_workers=0, use_cpu=True, seed=0, data_seed=0, full_determinism=True, disable_tqdm=True,
            logging_strategy="no")
        trainer = ResumeByNameTrainer(model=model, args=args, train_dataset=Tokens(), **kw)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return trainer

    ref_model = Small()
    train(ref_model, tmp_path / "ref")
    ref = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    train(Small(), tmp_path / "run", save=True)
    new = Small("classifier")
    trainer = train(new, tmp_path / "resumed", resume=tmp_path / "run" / "checkpoint-2",
                    rename=["head.=classifier."])
    _assert_same_by_name(new, ref)
    rep = trainer.optckpt_hook.report
    assert rep is not None and not rep.missing and not rep.unexpected
