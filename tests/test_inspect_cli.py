"""``optckpt inspect`` through the CLI: every fixture layout, JSON purity, errors."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch
from conftest import FIXTURES, invoke, run_cli

LAYOUTS = [
    ("seed/optimizer_0.pth", ["--model", str(FIXTURES / "seed" / "model_0.pth")], "torch-optimizer"),
    ("bundle.pt", [], "torch-bundle"),
    ("cuda_saved.pt", [], "torch-bundle"),
    ("named_optimizer.pt", [], "torch-bundle"),
    ("tsm_sgd.pth.tar", [], "timm"),
    ("model.safetensors", [], "safetensors"),
    ("hf_trainer/checkpoint-3", [], "hf-trainer"),
    ("accelerate/state", [], "accelerate"),
    ("lightning/last.ckpt", [], "lightning"),
]


@pytest.mark.parametrize("rel,extra,layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_inspect_every_layout(rel, extra, layout):
    r = invoke("inspect", str(FIXTURES / rel), *extra, "--format", "json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)  # nothing but JSON on stdout
    assert report["layout"] == layout
    names = [t["name"] for m in report["models"] for t in m["tensors"]]
    assert names, "parameter names shown"
    for opt in report["optimizers"]:
        assert opt["groups"] and sum(g["size"] for g in opt["groups"]) == opt["num_params"]
    table = invoke("inspect", str(FIXTURES / rel), *extra)
    assert table.exit_code == 0
    assert names[0] in table.stdout
    if report["optimizers"]:
        assert "group" in table.stdout and "hyperparameters" in table.stdout


def test_inspect_shows_cuda_origin():
    r = invoke("inspect", str(FIXTURES / "cuda_saved.pt"))
    assert r.exit_code == 0 and "saved on: cuda:0" in r.stdout


def test_inspect_guesses_classes():
    code, rep = 0, json.loads(invoke("inspect", str(FIXTURES / "bundle.pt"), "--format", "json").stdout)
    assert rep["optimizers"][0]["class"] == "AdamW"
    assert rep["schedulers"][0]["type"] == "CosineAnnealingLR"
    rep = json.loads(invoke("inspect", str(FIXTURES / "tsm_sgd.pth.tar"), "--format", "json").stdout)
    assert rep["optimizers"][0]["class"] == "SGD"
    assert [g["hparams"]["name"] for g in rep["optimizers"][0]["groups"]][-1] == "BN scale/shift"
    assert code == 0


def test_inspect_stats_counts_nonfinite(tmp_path):
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([p])
    p.sum().backward()
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"][1] = float("nan")
    torch.save({"model": {"p": p.detach()}, "optimizer": sd}, tmp_path / "nan.pt")
    r = invoke("inspect", str(tmp_path / "nan.pt"), "--stats", "--format", "json")
    rep = json.loads(r.stdout)
    assert rep["optimizers"][0]["nonfinite_state_values"] == 1
    assert rep["models"][0]["tensors"][0]["stats"]["max"] == pytest.approx(float(p.detach().max()))
    assert "NaN/Inf" in invoke("inspect", str(tmp_path / "nan.pt"), "--stats").stdout


def test_subprocess_json_and_module_entry():
    r = run_cli("inspect", "fixtures/bundle.pt", "--format", "json")
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_read_as_data_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"model": {"w": torch.ones(1)}, "extra": [{"x": _Evil(str(marker))}], "y": _Evil(str(marker))},
               tmp_path / "evil.pt")
    r = run_cli("inspect", str(tmp_path / "evil.pt"))
    assert r.returncode == 0 and r.stderr == ""
    assert "pickled call posix.system" in r.stdout and "nothing imported or run" in r.stdout
    assert not marker.exists()


def _bad_inputs(tmp_path):
    good = (FIXTURES / "bundle.pt").read_bytes()
    cases = {
        "empty.pt": b"",
        "garbage.pt": os.urandom(4096),
        "text.pt": b"hello, I am not a checkpoint\n" * 10,
        "truncated_half.pt": good[: len(good) // 2],
        "truncated_head.pt": good[:100],
        "truncated_tail.pt": good[:-30],
        "huge_safetensors_header.safetensors": (10**12).to_bytes(8, "little") + b'{"a":1}',
        "lying_safetensors.safetensors": _lying_safetensors(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    zf = tmp_path / "not_torch.zip"
    with zipfile.ZipFile(zf, "w") as z:
        z.writestr("hello.txt", "hi")
    return [*(tmp_path / n for n in cases), zf, tmp_path / "missing.pt"]


def _lying_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000000, 1000], "data_offsets": [0, 4000000000]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * 16


def test_bad_inputs_one_line_exit_2(tmp_path):
    for path in _bad_inputs(tmp_path):
        before = path.read_bytes() if path.exists() else None
        r = invoke("inspect", str(path))
        assert r.exit_code == 2, (path.name, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("optckpt: error:"), (path.name, r.stderr)
        assert r.stdout == ""
        if before is not None:
            assert path.read_bytes() == before


@pytest.mark.parametrize("which", [(0, 3), pytest.param((1, 2), marks=pytest.mark.slow)])
def test_bad_inputs_subprocess_no_traceback(tmp_path, which):
    """In a real process (nothing else on stderr): the empty file and a truncated one by default, garbage
    and text with ``-m slow`` (every bad input is refused in-process above)."""
    inputs = _bad_inputs(tmp_path)
    for path in (inputs[i] for i in which):
        r = run_cli("inspect", str(path))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_truncated_at_many_offsets(tmp_path):
    good = (FIXTURES / "seed" / "optimizer_0.pth").read_bytes()
    p = tmp_path / "t.pth"
    for cut in range(0, len(good), max(1, len(good) // 40)):
        p.write_bytes(good[:cut])
        r = invoke("inspect", str(p))
        assert r.exit_code == 2, cut
        assert r.stderr.startswith("optckpt: error:") and len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"x" * 100)
    r = invoke("--debug", "inspect", str(tmp_path / "g.pt"))
    assert r.exit_code == 2 and "Traceback" in r.stderr


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can read anything")
    p = tmp_path / "x.pt"
    p.write_bytes((FIXTURES / "bundle.pt").read_bytes())
    p.chmod(0)
    r = invoke("inspect", str(p))
    assert r.exit_code == 2 and "permission" in r.stderr


def test_inspect_shows_inferred_names():
    rep = json.loads(invoke("inspect", str(FIXTURES / "bundle.pt"), "--format", "json").stdout)
    opt = rep["optimizers"][0]
    assert opt["name_evidence"] == "model-order" and opt["ambiguous"] == 0
    assert [e["inferred_name"] for e in opt["entries"]][:2] == ["conv.weight", "conv.bias"]
    r = invoke("inspect", str(FIXTURES / "accelerate" / "state"))
    assert "shapes-only" in r.stdout and "--source" in r.stdout
