from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))


def run_cli(*args: str, cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """A real subprocess run of ``python -m optckpt``."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "optckpt", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


def invoke(*args: str):
    """In-process CLI run (fast): returns click's Result with exit_code, stdout, stderr."""
    from optckpt.cli import cli

    runner = CliRunner()
    return runner.invoke(cli, list(args), catch_exceptions=False)


def invoke_json(*args: str) -> tuple[int, dict]:
    r = invoke(*args, "--format", "json")
    return r.exit_code, json.loads(r.stdout)


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
