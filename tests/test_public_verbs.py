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
