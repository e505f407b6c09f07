"""The plain-torch fixtures are reproducible.

Two promises, checked separately because only one of them holds across machines:
- on one machine the generator is deterministic: two runs write byte-identical files;
- the committed fixtures are what the generator makes. Across CPUs torch picks other SIMD kernels
  (AVX2 vs AVX-512 reductions round differently), so trained values differ in the last bits and Adam
  amplifies that noise where a gradient is ~0 (a conv bias in front of BatchNorm moved by ~1e-4 after
  three steps at lr 1e-3). So the comparison with the committed files is exact for everything that
  involves no float arithmetic (zip record names and sizes, the whole pickle: keys, dtypes, shapes,
  strides, hyperparameters, step counts; the safetensors header) and within a tolerance for float
  tensor values: 3e-4 absolute (3x the largest drift seen between two CPUs, 9.9e-5 on that conv
  bias), well under the ~1e-3 one more Adam step at the fixtures' learning rate moves a parameter; a
  different seed, model or step count moves values by far more than that.
"""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT

FLOAT_ATOL = 3e-4
FLOAT_RTOL = 1e-4


def _generate(out: Path) -> list[Path]:
    # a subprocess: the generator pins torch's thread count and deterministic mode for its whole process
    r = subprocess.run([sys.executable, str(FIXTURES / "generate.py"), str(out)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())


def _zip_layout(path: Path) -> tuple[list[tuple[str, int]], bytes]:
    """Record names and sizes, and the pickle bytes: everything of a torch zip file but tensor bytes."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        pkl = next(i.filename for i in infos if i.filename.endswith("/data.pkl"))
        # serialization_id is derived from the content: it follows the tensor bytes
        layout = [(i.filename, i.file_size) for i in infos if not i.filename.endswith("serialization_id")]
        return layout, z.read(pkl)


def _safetensors_header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _load(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True, map_location="cpu")


def _compare_values(a: object, b: object, where: str, problems: list[str]) -> None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if (a.dtype, a.shape, a.stride()) != (b.dtype, b.shape, b.stride()):
            problems.append(f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif a.is_floating_point():
            if not torch.allclose(a, b, rtol=FLOAT_RTOL, atol=FLOAT_ATOL, equal_nan=True):
                problems.append(f"{where}: max |diff| {(a - b).abs().max().item():.3g}")
        elif not torch.equal(a, b):
            problems.append(f"{where}: integer values differ")
    elif isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            problems.append(f"{where}: keys {list(a)} vs {list(b)}")
            return
        for k in a:
            _compare_values(a[k], b[k], f"{where}/{k}", problems)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            problems.append(f"{where}: {type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b)}]")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _compare_values(x, y, f"{where}/{i}", problems)
    elif type(a) is not type(b) or a != b:
        problems.append(f"{where}: {a!r} vs {b!r}")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """One run of the generator, shared by the two tests below (each run starts torch and trains)."""
    out = tmp_path_factory.mktemp("generated")
    return out, _generate(out)


def test_the_generator_is_deterministic_on_one_machine(generated: tuple[Path, list[Path]], tmp_path: Path):
    a, first = generated
    second = _generate(tmp_path / "b")
    assert first == second
    differ = [str(rel) for rel in first if (a / rel).read_bytes() != (tmp_path / "b" / rel).read_bytes()]
    assert not differ, f"two runs of the generator on this machine wrote different bytes: {differ}"


def test_the_committed_fixtures_are_what_the_generator_makes(generated: tuple[Path, list[Path]]):
    tmp_path, written = generated
    assert {"seed/optimizer_0.pth", "bundle.pt", "model.safetensors", "nerf/000003.tar"} <= set(map(str, written))
    problems: list[str] = []
    for rel in written:
        new, old = tmp_path / rel, FIXTURES / rel
        assert old.is_file(), f"{rel} is written by the generator but not committed"
        if rel.suffix == ".safetensors":
            if _safetensors_header(new) != _safetensors_header(old):
                problems.append(f"{rel}: safetensors header differs")
        elif _zip_layout(new) != _zip_layout(old):
            problems.append(f"{rel}: zip records or pickle differ (structure, not float noise)")
        _compare_values(_load(new), _load(old), str(rel), problems)
    assert not problems, "regenerated fixtures differ from the committed ones:\n" + "\n".join(problems)


def test_the_comparison_catches_a_changed_generator(tmp_path: Path):
    """The tolerance is not so loose that a real change passes: one more Adam step, a pickle change."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = torch.optim.Adam([p], lr=1e-3)
    states = []
    for _ in range(2):
        p.grad = torch.randn(8, 4)
        opt.step()
        states.append(copy.deepcopy({"p": p.detach(), "opt": opt.state_dict()}))
    problems: list[str] = []
    _compare_values(states[0], states[1], "x", problems)
    assert any("max |diff|" in s for s in problems) and any("step" in s for s in problems)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"lr": 1e-3}, a)
    torch.save({"lr": 2e-3}, b)
    assert _zip_layout(a)[1] != _zip_layout(b)[1]
