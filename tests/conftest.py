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


def run_two_ranks(script_text: str, out: Path, tmp: Path) -> None:
    """Run ``script_text`` as a real 2-process gloo job (``python script out`` per rank, torchrun's
    environment variables); skips the test where torch.distributed cannot run here."""
    import socket

    script = tmp / "two_ranks.py"
    script.write_text(script_text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, str(script), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    if any(p.returncode for p in procs):
        pytest.skip(f"torch.distributed gloo is not usable here: {errs[0][-300:]!r}")


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
