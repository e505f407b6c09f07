"""The public verbs return what the CLI prints: for each command, ``optckpt.<verb>(...).to_json()`` is
the CLI's ``--format json`` output (same object), and ``exit_code`` the CLI's exit code."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, ROOT, invoke

import optckpt

B = str(FIXTURES / "bundle.pt")
NEW = str(FIXTURES / "models.py") + ":build_cnn_head_first"


def _same(cli_args: list[str], report: optckpt.Report) -> None:
    r = invoke(*cli_args, "--format", "json")
    assert r.exit_code == report.exit_code, r.output
    assert json.loads(r.stdout) == json.loads(report.to_json())


def test_check(tmp_path):
    _same(["check", B, "--target", NEW], optckpt.check(B, NEW))
    _same(["check", B, "--target", str(FIXTURES / "models.py") + ":build_cnn"],
          optckpt.check(B, str(FIXTURES / "models.py") + ":build_cnn"))
    seed = [str(FIXTURES / "seed" / "optimizer_0.pth"), "--model", str(FIXTURES / "seed" / "model_0.pth")]
    _same(["check", *seed, "--target", str(FIXTURES / "models.py") + ":build_model2"],
          optckpt.check(seed[0], str(FIXTURES / "models.py") + ":build_model2", model=seed[2]))


def test_inspect_and_diff():
    _same(["inspect", B, "--stats"], optckpt.inspect(B, stats=True))
    other = str(FIXTURES / "named_optimizer.pt")
    _same(["diff", B, other], optckpt.diff(B, other))
    _same(["diff", B, B], optckpt.diff(B, B))


def test_editing_verbs(tmp_path):
    _same(["remap", B, "--target", NEW, "--dry-run"], optckpt.remap(B, NEW, dry_run=True))
    _same(["reset", B, "--params", "classifier.*", "--dry-run"], optckpt.reset(B, ["classifier.*"], dry_run=True))
    _same(["set", B, "--scale-lr", "0.5", "--dry-run"], optckpt.set_hparams(B, scale_lr=0.5, dry_run=True))
    out = tmp_path / "fixed.pt"
    report = optckpt.remap(B, NEW, str(out))
    assert report["written"] == str(out) and optckpt.check(str(out), NEW).ok
    conv = optckpt.convert(B, "torch", str(tmp_path / "c.pt"))
    assert conv["written"] == str(tmp_path / "c.pt")


def _written_same(cli_args: list[str], report: optckpt.Report, cli_out: str) -> None:
    """A writing run: the same JSON but for the output path, and outputs with the same content."""
    r = invoke(*cli_args, "--format", "json")
    assert r.exit_code == report.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    assert cli.pop("written") == cli_out
    verb = json.loads(report.to_json())
    verb_out = verb.pop("written")
    assert cli == verb
    assert optckpt.diff(cli_out, verb_out).ok


def test_set_every_option_like_the_cli(tmp_path):
    """``set`` runs through the verb: dry runs, writes, --set / --group / --params / --scheduler keep."""
    tsm = str(FIXTURES / "tsm_sgd.pth.tar")
    _same(["set", tsm, "--group", "normal_bias", "--set", "lr_mult=3", "--dry-run"],
          optckpt.set_hparams(tsm, groups=["normal_bias"], set=["lr_mult=3"], dry_run=True))
    _same(["set", B, "--group", "0", "--lr", "0.1", "--weight-decay", "0.2", "--dry-run"],
          optckpt.set_hparams(B, groups=["0"], lr=0.1, weight_decay=0.2, dry_run=True))
    _same(["set", B, "--scale-lr", "0.5", "--scale-weight-decay", "2", "--scheduler", "keep", "--dry-run"],
          optckpt.set_hparams(B, scale_lr=0.5, scale_weight_decay=2, scheduler="keep", dry_run=True))
    out = str(tmp_path / "cli.pt")
    _written_same(["set", B, "--set", "betas=0.9,0.95", "--lr", "0.01", "-o", out],
                  optckpt.set_hparams(B, str(tmp_path / "verb.pt"), set=["betas=0.9,0.95"], lr=0.01), out)


def test_set_refusals_like_the_cli(tmp_path):
    """The CLI's usage errors (exit 2) are the verb's raised errors; a bad --set is one error for both."""
    for args, kwargs in ((["--lr", "1", "--scale-lr", "2"], {"lr": 1.0, "scale_lr": 2.0}),
                         (["--weight-decay", "1", "--scale-weight-decay", "2"],
                          {"weight_decay": 1.0, "scale_weight_decay": 2.0}),
                         (["--lr", "1", "--backup"], {"lr": 1.0, "backup": True}),
                         (["--set", "no_such_key=1"], {"set": ["no_such_key=1"]}),
                         (["--params", "classifier.*", "--lr", "1"], {"params": ["classifier.*"], "lr": 1.0})):
        r = invoke("set", B, *args, "-o", str(tmp_path / "x.pt"))
        assert r.exit_code == 2 and r.stderr.startswith("optckpt: error: ") and not r.stdout, (args, r.output)
        with pytest.raises(optckpt.OptckptError):
            optckpt.set_hparams(B, str(tmp_path / "x.pt"), **kwargs)
    assert not (tmp_path / "x.pt").exists()


def test_diff_every_option_like_the_cli(tmp_path):
    """``diff`` runs through the verb: sections, globs, tolerances, stats; exit 1 / 0 as its report says."""
    changed = str(tmp_path / "changed.pt")  # classifier's exp_avg zeroed: tensor differences
    assert optckpt.reset(B, ["classifier.*"], changed, keys=["exp_avg"], mode="zero")["written"] == changed
    lr = str(tmp_path / "lr.pt")
    optckpt.set_hparams(B, lr, scale_lr=0.5)
    for args, kwargs in (([], {}), (["--stats"], {"stats": True}), (["--only", "optimizer"], {"only": ["optimizer"]}),
                         (["--only", "model", "--only", "param_groups"], {"only": ["model", "param_groups"]}),
                         (["--params", "classifier.*"], {"params": ["classifier.*"]}),
                         (["--atol", "1e9"], {"atol": 1e9}), (["--rtol", "0.5"], {"rtol": 0.5})):
        for other in (changed, lr):
            report = optckpt.diff(B, other, **kwargs)
            _same(["diff", B, other, *args], report)
            assert report.exit_code == (0 if report["identical"] else 1)
    assert not optckpt.diff(B, lr).ok and not optckpt.diff(B, changed).ok
    seed = FIXTURES / "seed"
    _same(["diff", str(seed / "optimizer_0.pth"), str(seed / "optimizer_0.pth"),
           "--model-a", str(seed / "model_0.pth"), "--model-b", str(seed / "model_0.pth")],
          optckpt.diff(str(seed / "optimizer_0.pth"), str(seed / "optimizer_0.pth"),
                       model_a=str(seed / "model_0.pth"), model_b=str(seed / "model_0.pth")))


def test_diff_progress_hooks():
    """``progress_total`` once, before any ``progress``; the ticks add up to at most that total."""
    calls: list[tuple[str, int]] = []
    report = optckpt.diff(B, str(FIXTURES / "named_optimizer.pt"), progress=lambda n: calls.append(("tick", n)),
                          progress_total=lambda n: calls.append(("total", n)))
    assert calls[0][0] == "total" and [c for c, _ in calls].count("total") == 1
    ticks = sum(n for c, n in calls if c == "tick")
    assert 0 < ticks <= calls[0][1], calls[:5]
    assert report.data == optckpt.diff(B, str(FIXTURES / "named_optimizer.pt")).data


def test_writing_verbs_like_the_cli(tmp_path):
    """remap / reset / convert writing for real: the CLI's JSON (or line) and output are the verb's."""
    out = str(tmp_path / "remap_cli.pt")
    _written_same(["remap", B, "--target", NEW, "-o", out], optckpt.remap(B, NEW, str(tmp_path / "remap_verb.pt")),
                  out)
    out = str(tmp_path / "reset_cli.pt")
    _written_same(["reset", B, "--params", "classifier.*", "--keys", "exp_avg", "--mode", "zero", "-o", out],
                  optckpt.reset(B, ["classifier.*"], str(tmp_path / "reset_verb.pt"), keys=["exp_avg"], mode="zero"),
                  out)
    for to, name in (("torch", "c.pt"), ("dcp", "c_dcp"), ("safetensors", "c.safetensors")):
        cli_out = str(tmp_path / f"cli_{name}")
        r = invoke("convert", B, "--to", to, "-o", cli_out)
        report = optckpt.convert(B, to, str(tmp_path / f"verb_{name}"))  # type: ignore[arg-type]
        assert r.exit_code == report.exit_code == 0 and r.stdout == f"written: {cli_out}\n", r.output
        assert report["written"] == str(tmp_path / f"verb_{name}")
        assert optckpt.diff(cli_out, report["written"]).ok


def test_inspect_like_the_cli():
    for path in (B, str(FIXTURES / "tsm_sgd.pth.tar"), str(FIXTURES / "model.safetensors")):
        _same(["inspect", path], optckpt.inspect(path))
    seed = FIXTURES / "seed"
    _same(["inspect", str(seed / "optimizer_0.pth"), "--model", str(seed / "model_0.pth")],
          optckpt.inspect(str(seed / "optimizer_0.pth"), model=str(seed / "model_0.pth")))


def test_errors_are_raised_not_printed(tmp_path):
    with pytest.raises(optckpt.LoadError):
        optckpt.check(str(tmp_path / "nothing.pt"), NEW)
    with pytest.raises(optckpt.WriteError):
        optckpt.remap(B, NEW)  # no output, not in place


def test_a_ci_gate_in_python(tmp_path, monkeypatch):
    """The README's gate: fail the job when the new code would misapply the saved state."""
    monkeypatch.chdir(ROOT)
    report = optckpt.check("fixtures/bundle.pt", target="fixtures/models.py:build_cnn_head_first")
    assert not report.ok and report["verdict"] == "would_misapply"
    moved = [p["name"] for p in report["params"] if p["status"] == "moved"]
    assert moved and "classifier.weight" in moved
