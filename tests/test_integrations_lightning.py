"""Lightning: train, ``trainer.save_checkpoint``, change the module (reorder + a new layer), resume
with ``trainer.fit(ckpt_path=...)`` plus the callback, and match the uninterrupted run by name."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

import real_models  # noqa: E402  (fixtures/, on sys.path via conftest)

from optckpt import MappingError  # noqa: E402
from optckpt.integrations.lightning import LoadOptimizerByName  # noqa: E402

# --- one optimizer (automatic optimization) ------------------------------------------------------


class Tiny(pl.LightningModule):
    """TinyNet classifier; ``changed=True``: submodules registered in another order (head first),
    plus a new auxiliary head trained on detached features (the old parameters' gradients are
    unchanged, so their trajectory must match the old run exactly)."""

    def __init__(self, changed: bool = False):
        super().__init__()
        self.changed = changed
        self.net = real_models.build_tinynet_reordered() if changed else real_models.build_tinynet()
        if changed:
            self.aux = nn.Linear(8, 4)
            self.strict_loading = False  # the old checkpoint has no weights for it

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.net.body(self.net.embed(x)).mean(dim=1)
        loss = nn.functional.cross_entropy(self.net.head(h), y)
        if self.changed:
            loss = loss + nn.functional.cross_entropy(self.aux(h.detach()), y)
        return loss

    def train_dataloader(self):
        x, y = real_models.synthetic_tinynet_data()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5),
                                                   "interval": "step"}}


# --- two optimizers (manual optimization, GAN-style) --------------------------------------------


class Gen(nn.Module):
    def __init__(self, changed: bool):
        super().__init__()
        if changed:  # same parameters, registered output first
            self.out = nn.Linear(8, 6)
            self.inp = nn.Linear(3, 8)
        else:
            self.inp = nn.Linear(3, 8)
            self.out = nn.Linear(8, 6)

    def forward(self, z):
        return self.out(torch.tanh(self.inp(z)))


class Disc(nn.Module):
    def __init__(self, changed: bool):
        super().__init__()
        if changed:
            self.score = nn.Linear(8, 1)
            self.feat = nn.Linear(6, 8)
        else:
            self.feat = nn.Linear(6, 8)
            self.score = nn.Linear(8, 1)

    def forward(self, x):
        return self.score(torch.relu(self.feat(x)))


class Gan(pl.LightningModule):
    def __init__(self, changed: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.changed = changed
        torch.manual_seed(0)
        if changed:  # discriminator registered first; a new layer in the discriminator's optimizer
            self.disc, self.gen = Disc(True), Gen(True)
            self.critic = nn.Linear(6, 1)
            self.strict_loading = False
        else:
            self.gen, self.disc = Gen(False), Disc(False)

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.linspace(-1, 1, real.shape[0] * 3, device=real.device).reshape(-1, 3) * (1 + batch_idx)
        fake = self.gen(z)
        g_loss = nn.functional.softplus(-self.disc(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        d_loss = (nn.functional.softplus(-self.disc(real)) + nn.functional.softplus(self.disc(fake.detach()))).mean()
        if self.changed:
            d_loss = d_loss + self.critic(fake.detach()).pow(2).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

    def train_dataloader(self):
        real = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(real), batch_size=4, shuffle=False)

    def configure_optimizers(self):
        disc = list(self.disc.parameters()) + (list(self.critic.parameters()) if self.changed else [])
        return [torch.optim.Adam(self.gen.parameters(), lr=1e-2, betas=(0.5, 0.9)),
                torch.optim.Adam(disc, lr=2e-2, betas=(0.5, 0.9))]


# --- helpers -------------------------------------------------------------------------------------


def _fit(module, root, epochs, ckpt=None, callbacks=()):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, deterministic=True,
                         default_root_dir=str(root), callbacks=list(callbacks))
    trainer.fit(module, ckpt_path=str(ckpt) if ckpt else None)
    return trainer


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_same_by_name(got, ref):
    assert set(ref) <= set(got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


def _checkpoint(module, tmp_path, callbacks=()):
    trainer = _fit(module, tmp_path / "first", 1, callbacks=callbacks)
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(str(path))
    return path


@pytest.mark.parametrize("cls", [Tiny, Gan], ids=["one-optimizer", "gan-manual"])
def test_resume_changed_module_by_name_matches_uninterrupted(cls, tmp_path, caplog):
    ref = _params(_fit(cls(), tmp_path / "ref", 2).lightning_module)  # the uninterrupted run
    ckpt = _checkpoint(cls(), tmp_path)  # a plain Lightning checkpoint: no param_names in it
    saved = torch.load(ckpt, weights_only=True)
    assert all("param_names" not in g for s in saved["optimizer_states"] for g in s["param_groups"])

    callback = LoadOptimizerByName()
    new = cls(changed=True)
    with caplog.at_level(logging.INFO, logger="pytorch_lightning.optckpt"):
        trainer = _fit(new, tmp_path / "resumed", 2, ckpt=ckpt, callbacks=[callback])
    _assert_same_by_name(_params(new), ref)
    assert trainer.global_step == _fit(cls(), tmp_path / "count", 2).global_step

    reports = [h.report for h in callback.hooks]
    assert all(r is not None for r in reports) and len(reports) == len(trainer.optimizers)
    new_names = {"aux.weight", "aux.bias"} if cls is Tiny else {"critic.weight", "critic.bias"}
    assert {n for r in reports for n in r.missing} == new_names  # type: ignore[union-attr]
    assert not any(r.unexpected or r.ambiguous for r in reports)  # type: ignore[union-attr]
    assert sum(len(r.moved) for r in reports) > 0  # type: ignore[union-attr]
    ours = [r for r in caplog.records if r.name == "pytorch_lightning.optckpt"]
    assert len(ours) == len(reports) and all("loaded by name" in r.getMessage() for r in ours)
    assert any("missing ['" in r.getMessage() and r.levelno == logging.WARNING for r in ours)


@pytest.mark.parametrize("cls", [Tiny, Gan], ids=["one-optimizer", "gan-manual"])
def test_without_the_callback_the_same_resume_crashes_or_diverges(cls, tmp_path):
    ref = _params(_fit(cls(), tmp_path / "ref", 2).lightning_module)
    ckpt = _checkpoint(cls(), tmp_path)
    new = cls(changed=True)
    try:
        _fit(new, tmp_path / "resumed", 2, ckpt=ckpt)
    except (ValueError, RuntimeError):
        return  # torch refused the positional load (group sizes or shapes differ)
    got = _params(new)
    assert any(not torch.allclose(got[n], ref[n], atol=1e-6) for n in ref)


def test_checkpoints_saved_through_the_callback_carry_param_names_and_resume_exactly(tmp_path):
    ref = _params(_fit(Gan(), tmp_path / "ref", 2).lightning_module)
    ckpt = _checkpoint(Gan(), tmp_path, callbacks=[LoadOptimizerByName()])
    saved = torch.load(ckpt, weights_only=True)
    names = [g["param_names"] for s in saved["optimizer_states"] for g in s["param_groups"]]
    assert names == [["gen.inp.weight", "gen.inp.bias", "gen.out.weight", "gen.out.bias"],
                     ["disc.feat.weight", "disc.feat.bias", "disc.score.weight", "disc.score.bias"]]
    callback = LoadOptimizerByName()
    new = Gan(changed=True)
    _fit(new, tmp_path / "resumed", 2, ckpt=ckpt, callbacks=[callback])
    _assert_same_by_name(_params(new), ref)
    assert all(h.report is not None and h.report.evidence == "param_names" for h in callback.hooks)


def test_ambiguous_saved_state_raises_unless_allowed(tmp_path):
    """A checkpoint whose state_dict was emptied gives no order evidence: TinyNet's same-shape
    parameters cannot be told apart, so the resume refuses instead of guessing."""
    ckpt = _checkpoint(Tiny(), tmp_path)
    sd = torch.load(ckpt, weights_only=True)
    sd["state_dict"] = {}
    torch.save(sd, tmp_path / "no_order.ckpt")
    with pytest.raises(MappingError, match="allow_ambiguous"):
        _fit(Tiny(changed=True), tmp_path / "strict", 2, ckpt=tmp_path / "no_order.ckpt",
             callbacks=[LoadOptimizerByName()])
    callback = LoadOptimizerByName(allow_ambiguous=True)
    _fit(Tiny(changed=True), tmp_path / "allowed", 2, ckpt=tmp_path / "no_order.ckpt", callbacks=[callback])
    report = callback.hooks[0].report
    # no model order saved: only a shape found once on each side names its index (the embedding); the new
    # aux head shares its shape with net.head, so it is one of the candidates of an uncertain index (reset)
    assert report is not None and report.evidence == "target-shapes" and report.moved == ["net.embed.weight"]
    assert len(report.ambiguous) == 8 and not report.missing


def test_a_scheduler_saved_for_other_param_groups_is_refused(tmp_path):
    ckpt = _checkpoint(Tiny(), tmp_path)

    class TwoGroups(Tiny):
        def configure_optimizers(self):
            aux = list(self.aux.parameters())
            opt = torch.optim.AdamW([{"params": list(self.net.parameters())}, {"params": aux, "lr": 1e-3}], lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)}

    with pytest.raises(MappingError, match="lr scheduler 0: saved for 1 param groups, the optimizer now has 2"):
        _fit(TwoGroups(changed=True), tmp_path / "resumed", 2, ckpt=ckpt, callbacks=[LoadOptimizerByName()])
