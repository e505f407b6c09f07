"""The fast paths (issue #20): memcmp bit equality, the summarised plan table, progress on a terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, invoke, invoke_json
from torch import nn

from optckpt.verify import bit_equal


def test_bit_equal_memcmp_path_agrees_with_bytes():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 37, generator=g)
    assert bit_equal(a, a.clone())
    b = a.clone()
    b.view(torch.int32)[500, 3] ^= 1  # one bit of one element
    assert not bit_equal(a, b)
    nan1 = torch.tensor([float("nan")] * 4)
    nan2 = nan1.clone()
    nan2.view(torch.int32)[2] ^= 1  # another NaN payload: equal as values, not as bits
    assert torch.isnan(nan2).all() and not bit_equal(nan1, nan2)
    assert bit_equal(torch.tensor([0.0]), torch.tensor([0.0])) and not bit_equal(torch.tensor([0.0]),
                                                                                 torch.tensor([-0.0]))
    # differently aligned addresses of equal bytes (odd offsets into a byte buffer)
    base = torch.randint(0, 256, (4000,), dtype=torch.uint8, generator=g)
    buf = torch.zeros(9100, dtype=torch.uint8)
    buf[1:4001] = base
    buf[5003:9003] = base
    x, y = buf[1:4001], buf[5003:9003]
    assert x.data_ptr() % 8 != y.data_ptr() % 8 and bit_equal(x, y)
    # non-contiguous views take the word path and agree
    assert bit_equal(a.t(), a.clone().t()) and not bit_equal(a.t(), b.t())
    assert not bit_equal(a, a.to(torch.float64)) and not bit_equal(a, a.reshape(37, 1000))


def _many_param_checkpoint(tmp_path, n_layers=50):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    names = [n for n, _ in model.named_parameters()]
    target = tmp_path / "reversed.json"
    target.write_text(json.dumps(names[::-1]))
    return path, target, len(names)


def test_remap_table_is_summarised_unless_verbose(tmp_path):
    path, target, n = _many_param_checkpoint(tmp_path)
    r = invoke("remap", str(path), "--target", str(target), "-o", str(tmp_path / "a.pt"))
    assert r.exit_code == 0, r.output
    moved_rows = [line for line in r.stdout.splitlines() if line.rstrip().endswith("move")]
    assert len(moved_rows) == 40
    assert f"... {n - 40} more (use --verbose or --format json for all)" in r.stdout
    r = invoke("remap", str(path), "--target", str(target), "-o", str(tmp_path / "b.pt"), "--verbose")
    assert r.exit_code == 0, r.output
    assert len([line for line in r.stdout.splitlines() if line.rstrip().endswith("move")]) == n
    assert "more (use --verbose" not in r.stdout
    code, report = invoke_json("remap", str(path), "--target", str(target), "--dry-run")
    assert code == 0 and sum(s["action"] == "move" for s in report["slots"]) == n
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in range(n))


def test_reset_table_is_summarised_unless_verbose(tmp_path):
    path, _, n = _many_param_checkpoint(tmp_path)
    r = invoke("reset", str(path), "--params", "*", "-o", str(tmp_path / "r.pt"))
    assert r.exit_code == 0, r.output
    assert f"... {n - 40} more (use --verbose or --format json for all)" in r.stdout
    r = invoke("reset", str(path), "--params", "*", "-o", str(tmp_path / "r2.pt"), "-v")
    assert r.exit_code == 0 and "more (use" not in r.stdout and f"{n - 1}  " in r.stdout


def _run_on_pty(args: list[str], json_to_pipe: bool) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; stdout a pipe. Returns (exit code, stderr text)."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="80")
    p = subprocess.Popen([sys.executable, "-m", "optckpt", *args, *(["--format", "json"] if json_to_pipe else [])],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    p.communicate(timeout=300)
    os.close(master)
    return p.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminals as on Linux")
def test_progress_on_a_terminal_for_big_writes_silent_for_json_pipes(tmp_path):
    """A real > 256 MB edit: a bar on a terminal's stderr; none when JSON goes to a pipe, none for
    small checkpoints."""
    model = nn.Linear(8192, 8300)  # 272 MB of weights; SGD without momentum keeps no state
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    big = tmp_path / "big.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, big)
    del model, opt
    target = tmp_path / "names.json"
    target.write_text(json.dumps(["bias", "weight"]))
    code, err = _run_on_pty(["remap", str(big), "--target", str(target), "-o", str(tmp_path / "o.pt")], False)
    assert code == 0 and "writing" in err and "100%" in err, err[-500:]
    code, err = _run_on_pty(["remap", str(big), "--target", str(target), "-o", str(tmp_path / "o.pt")], True)
    assert code == 0 and "writing" not in err, err[-500:]
    small, small_target, _ = _many_param_checkpoint(tmp_path)
    code, err = _run_on_pty(["remap", str(small), "--target", str(small_target), "-o", str(tmp_path / "s.pt")],
                            False)
    assert code == 0 and "writing" not in err, err[-500:]
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    src = torch.load(big, weights_only=True, mmap=True)
    assert torch.equal(out["model"]["weight"], src["model"]["weight"])
    assert out["optimizer"]["param_groups"][0]["params"] == [0, 1]


def test_all_bit_equal_on_every_core_finds_one_flipped_bit():
    from optckpt.verify import all_bit_equal

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=g) for n in [1 << 20] * 6 + [7, 1, 300_000] * 20]  # > 16 MiB: batched
    pairs = [(x, x.clone()) for x in xs]
    seen: list[torch.Tensor] = []
    assert all_bit_equal(pairs, seen.append) and len(seen) == len(pairs)
    for i in (0, 17, len(pairs) - 1):
        flipped = [(x, y.clone()) for x, y in pairs]
        flipped[i][1].view(torch.int32)[-1] ^= 1
        assert not all_bit_equal(flipped)
    assert not all_bit_equal([(xs[0], xs[0].clone()), (xs[1], xs[1][:10].clone())])  # shapes differ
