"""The plain-torch fixtures are reproducible: regenerating them gives the committed bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, ROOT


def test_regenerating_the_fixtures_gives_byte_identical_files(tmp_path: Path):
    # a subprocess: the generator pins torch's thread count and deterministic mode for its whole process
    r = subprocess.run([sys.executable, str(FIXTURES / "generate.py"), str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert {"seed/optimizer_0.pth", "bundle.pt", "model.safetensors", "nerf/000003.tar"} <= set(map(str, written))
    differ = [str(rel) for rel in written if (tmp_path / rel).read_bytes() != (FIXTURES / rel).read_bytes()]
    assert not differ, f"regenerated fixtures differ from the committed ones: {differ}"
