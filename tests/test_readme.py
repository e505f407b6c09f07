"""Every code block of README.md runs as written, from the repository root, on the fixtures.

* ``bash`` blocks: each ``optckpt ...`` command runs through the CLI (in-process; one with an
  environment prefix, such as the completion lines, as a subprocess). It must exit 0, or 1 where its
  line says ``# exit 1``. The commands that are not optckpt (installing, the test suite itself, the
  benchmarks, the fixture generator, which ``test_fixtures.py`` runs) are listed in ``NOT_RUN``; any
  other command fails the test until it is classified.
* ``python`` blocks run as scripts (``python -c``, so ``from fixtures.models import ...`` resolves
  from the root). A block whose comment says ``# SomeError: message ...`` must fail with exactly that.
* ``py`` blocks are fragments of the reader's own training script (they use its model, trainer and
  data): not run here; each one's integration is exercised for real by ``tests/test_integrations_*``.
* ``text`` blocks are synopses: every ``--option`` they list must be an option of that command.

Paths under ``/tmp/`` are redirected to a per-test directory; the fixtures must be left untouched.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, invoke

README = (ROOT / "README.md").read_text(encoding="utf-8")

# commands the README shows that this test does not run, and why
NOT_RUN = {
    "python3 -m venv": "installing (network)",
    ". .venv/bin/activate": "installing",
    "pip install": "installing (network)",
    "pytest": "the test suite itself",
    "python benchmarks/": "benchmarks take minutes (benchmarks/README.md)",
    "python fixtures/generate.py": "run by tests/test_fixtures.py (into a temp dir)",
}


def _blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, body) of every fenced block in ``lang``."""
    out = []
    for m in re.finditer(r"^```(\w+)\n(.*?)^```", README, re.S | re.M):
        if m.group(1) == lang:
            out.append((README.count("\n", 0, m.start()) + 1, m.group(2)))
    return out


def _commands(body: str) -> list[tuple[str, int]]:
    """Each shell command of a block (``&&`` / ``;`` split) with the exit code its line promises."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        code, _, comment = line.partition("  #") if not line.startswith("#") else ("", "", line)
        expected = 1 if re.search(r"\bexit 1\b", comment) else 0
        for part in re.split(r"&&|;", code):
            if part.strip():
                out.append((part.strip(), expected))
    return out


def _fixture_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(FIXTURES)).encode() + p.read_bytes())
    return h.hexdigest()


def _run_shell(cmd: str, expected: int, tmp: Path) -> str | None:
    """Run one README shell command; the reason it failed, or None."""
    cmd = cmd.replace("/tmp/", f"{tmp}/")
    if any(cmd.startswith(prefix) for prefix in NOT_RUN):
        return None
    wrapped = re.fullmatch(r'eval "\$\((.*)\)"', cmd)
    if wrapped:
        cmd = wrapped.group(1)
    words = shlex.split(cmd)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if not words or words[0] != "optckpt":
        return f"unclassified command (run it here or add it to NOT_RUN): {cmd}"
    if env:  # e.g. shell completion: a real process, named optckpt
        r = subprocess.run([sys.executable, "-m", "optckpt", *words[1:]], capture_output=True, text=True,
                           cwd=ROOT, env=dict(os.environ, **env), timeout=120)
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        res = invoke(*words[1:])
        code, stdout, stderr = res.exit_code, res.stdout, res.stderr
    if code != expected or not stdout.strip():
        return f"{cmd}: exit {code} (expected {expected}); stderr: {stderr.strip()[:300]}"
    return None


@functools.cache
def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    """A python block as a script; run once per session (the opening example serves two tests)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_every_readme_code_block_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    before = _fixture_digest()
    blocks = [(line, lang, body) for lang in ("bash", "python") for line, body in _blocks(lang)]
    assert len(blocks) >= 8
    failures = []
    ran = 0
    for line, lang, body in sorted(blocks):  # document order: a later block may read an earlier one's output
        if lang == "bash":
            for cmd, expected in _commands(body):
                why = _run_shell(cmd, expected, tmp_path)
                if why:
                    failures.append(f"README.md:{line}: {why}")
                ran += 1
            continue
        code = body.replace("/tmp/", f"{tmp_path}/")
        r = _run_python(code)
        promised = re.search(r"#\s*(\w+Error): (.*?)(?: \.\.\.)?$", body, re.M)
        if promised:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
            if r.returncode == 0 or not last.startswith(f"{promised.group(1)}: {promised.group(2)}"):
                failures.append(f"README.md:{line}: expected {promised.group(0)!r}, got exit {r.returncode}: {last}")
        elif r.returncode != 0:
            failures.append(f"README.md:{line}: python block failed: {r.stderr.strip().splitlines()[-1:]}")
        ran += 1
    assert not failures, "\n".join(failures)
    assert ran >= 20
    assert _fixture_digest() == before, "a README example modified the fixtures"


def test_opening_example_fails_the_way_the_text_says():
    """The first example is the problem statement: plain loading into the reordered model must crash
    at step(), with the message the README quotes (not merely run and exit 0)."""
    line, body = _blocks("python")[0]
    assert "opt.step()" in body and "load_state_dict" in body
    r = _run_python(body)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith(
        "RuntimeError: The size of tensor a (2) must match the size of tensor b (3)"), r.stderr[-500:]
    where = int(re.search(r'File "<string>", line (\d+)', r.stderr).group(1))  # type: ignore[union-attr]
    assert body.splitlines()[where - 1].startswith("opt.step()")  # it is step() that fails, not loading


def test_synopses_list_only_real_options():
    from optckpt.cli import cli

    checked = 0
    for _, body in _blocks("text"):
        command = None
        for line in body.splitlines():
            m = re.match(r"\s*optckpt\s+(\w+)", line)
            if m:
                command = cli.commands[m.group(1)]
            if command is None:
                continue
            known = {o for p in command.params for o in getattr(p, "opts", [])}
            for opt in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line):
                assert opt in known, f"README synopsis lists {opt} for optckpt {command.name}"
                checked += 1
    assert checked > 30
