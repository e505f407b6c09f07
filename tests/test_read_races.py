"""A file shortened while optckpt reads it: one error line and exit 2, never a SIGBUS death.

Real ``optckpt inspect --stats`` processes on a ~200 MB checkpoint, while another process truncates
the file at random moments (uniform over the measured duration of an undisturbed run)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

_TRUNCATE = r"""
import os, sys, time
path, delay, length = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
time.sleep(delay)
t = time.monotonic()
os.truncate(path, length)  # waits while optckpt holds its read lease
print(time.monotonic() - t)
"""


def _big_checkpoint(path: Path) -> None:
    """~200 MB: a 16M-parameter model and Adam's two moments."""
    g = torch.Generator().manual_seed(0)
    model = {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(16)}
    names = list(model)
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(1024, 1024, generator=g) * 1e-3,
                 "exp_avg_sq": torch.rand(1024, 1024, generator=g) * 1e-6} for i in range(len(names))}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
               "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
               "params": list(range(len(names)))}]
    torch.save({"model": model, "optimizer": {"state": state, "param_groups": groups}, "epoch": 1}, path)


def _inspect(p: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "optckpt", "inspect", str(p), "--stats", "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory-mapped reads and leases: Linux")
def test_inspect_stats_survives_truncation_at_random_moments(tmp_path):
    src = tmp_path / "big.pt"
    _big_checkpoint(src)
    size = src.stat().st_size
    assert size > 190 * 2**20
    p = tmp_path / "trial.pt"
    shutil.copyfile(src, p)
    t0 = time.monotonic()
    ok = _inspect(p)
    out, err = ok.communicate(timeout=300)
    duration = time.monotonic() - t0
    assert ok.returncode == 0, err
    assert '"nonfinite_state_values"' in out
    script = tmp_path / "truncate.py"
    script.write_text(_TRUNCATE)
    rng = random.Random(27)
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 120
    trials = 0
    while trials < 10 and time.monotonic() < deadline:
        trials += 1
        shutil.copyfile(src, p)
        delay = rng.uniform(0.0, duration)
        length = rng.choice([0, rng.randrange(size // 4), rng.randrange(size // 4, size)])
        proc = _inspect(p)
        cutter = subprocess.Popen([sys.executable, str(script), str(p), str(delay), str(length)],
                                  stdout=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=300)
        waited, _ = cutter.communicate(timeout=300)
        assert cutter.returncode == 0
        assert proc.returncode >= 0, f"killed by signal {-proc.returncode} (delay {delay:.2f}s, cut to {length})"
        assert proc.returncode in (0, 2), (proc.returncode, err)
        if proc.returncode == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("optckpt: error: "), err
            assert set(json.loads(out)) == {"schema_version", "error"}  # nothing reported from a read that raced
            key = "changed" if "changed while being read" in err else "load error"
        else:
            assert '"nonfinite_state_values"' in out
            key = "ok"
        seen[key] = seen.get(key, 0) + 1
        print(f"delay {delay:.2f}s cut to {length}: {key}; the truncate waited {float(waited):.3f}s")
    print("outcomes:", seen, "undisturbed run:", round(duration, 2), "s")
    assert trials >= 4


def test_stats_read_mapped_bytes_with_pread(tmp_path):
    """Without a lease (another user's file, NFS): the stats of a memory-mapped tensor come from
    private pread buffers, equal to those of the same tensor in memory; once the file is shortened,
    they are an error, not a SIGBUS."""
    from optckpt.errors import LoadError
    from optckpt.inspect import tensor_stats

    p = tmp_path / "ck.pt"
    g = torch.Generator().manual_seed(1)
    saved = {"a": torch.randn(3000, 1000, generator=g), "b": torch.randn(77, generator=g).to(torch.bfloat16),
             "c": torch.arange(1000) % 3 == 0, "d": torch.tensor([1.0, float("nan"), float("inf")])}
    torch.save(saved, p)
    mapped = torch.load(p, weights_only=True, mmap=True)
    for k, v in saved.items():
        assert tensor_stats(mapped[k]) == tensor_stats(v.clone()), k
    os.truncate(p, 4096)
    with pytest.raises(LoadError, match="changed while being read"):
        tensor_stats(mapped["a"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="leases: Linux")
def test_a_truncation_waits_for_the_reader_which_stops_at_once(tmp_path):
    """The lease: another process's truncate waits; the read stops with "changed while being read"
    at the next Python instruction, and the truncate goes on once the reader has let go."""
    from optckpt.errors import LoadError
    from optckpt.io.readguard import stable_reads

    p = tmp_path / "ck.pt"
    torch.save({"a": torch.zeros(1000)}, p)
    script = tmp_path / "truncate.py"
    script.write_text(_TRUNCATE)
    reached = []
    with pytest.raises(LoadError, match="changed while being read"):
        with stable_reads(str(p)):
            cutter = subprocess.Popen([sys.executable, str(script), str(p), "0", "10"], stdout=subprocess.PIPE,
                                      text=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # reading...
                time.sleep(0.01)
                assert p.stat().st_size > 10  # never cut while the lease is held
            reached.append("end")  # never: the break signal stopped the read
    waited, _ = cutter.communicate(timeout=60)
    assert cutter.returncode == 0 and not reached and p.stat().st_size == 10
    # a file open for writing when the read starts (a save in progress) is refused before it is read
    with open(p, "r+b"):
        with pytest.raises(LoadError, match="open for writing by another process"):
            with stable_reads(str(p)):
                pass
    # replaced by a rename (no lease is broken: the old inode stays readable): the result is withheld
    with pytest.raises(LoadError, match="changed while being read"):
        with stable_reads(str(p)):
            torch.save({"b": torch.ones(3)}, tmp_path / "new.pt")
            os.replace(tmp_path / "new.pt", p)
    # ... also when the body failed on the changed file
    with pytest.raises(LoadError, match="changed while being read"):
        with stable_reads(str(p)):
            torch.save({"c": torch.ones(3)}, tmp_path / "new.pt")
            os.replace(tmp_path / "new.pt", p)
            raise LoadError(f"{p}: truncated or corrupt zip container")
    # nothing changes: the body's result stands
    with stable_reads(str(p), str(tmp_path)):
        pass


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory-mapped reads and leases: Linux")
def test_remap_and_convert_survive_truncation_of_their_input(tmp_path):
    """Editing commands read their input under the same leases: a truncation while ``remap -o`` or
    ``convert`` runs is one line and exit 2 (never a signal death); whatever output exists afterwards
    is the complete, right one (written before the change, or not at all)."""
    src = tmp_path / "big.pt"
    _big_checkpoint(src)
    size = src.stat().st_size
    names = tmp_path / "names.json"
    names.write_text(json.dumps([f"layer{i}.weight" for i in reversed(range(16))]))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    commands = {
        "remap": lambda p, out: ["remap", str(p), "--target", str(names), "-o", str(out)],
        "convert": lambda p, out: ["convert", str(p), "--to", "safetensors", "-o", str(out)],
    }
    p = tmp_path / "trial.pt"
    reference: dict[str, Path] = {}
    durations: dict[str, float] = {}
    for cmd, argv in commands.items():  # undisturbed runs: the reference outputs and the durations
        shutil.copyfile(src, p)
        out = tmp_path / f"ref-{cmd}"
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "optckpt", *argv(p, out)], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=300)
        durations[cmd] = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        reference[cmd] = out
    script = tmp_path / "truncate.py"
    script.write_text(_TRUNCATE)
    rng = random.Random(31)
    seen: dict[str, int] = {}
    for trial in range(6):
        cmd = "remap" if trial % 2 == 0 else "convert"
        shutil.copyfile(src, p)
        out = tmp_path / f"out-{trial}"
        delay = rng.uniform(0.0, durations[cmd])
        length = rng.choice([0, rng.randrange(size // 4, size)])
        proc = subprocess.Popen([sys.executable, "-m", "optckpt", *commands[cmd](p, out)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        cutter = subprocess.Popen([sys.executable, str(script), str(p), str(delay), str(length)],
                                  stdout=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=300)
        cutter.communicate(timeout=300)
        assert proc.returncode >= 0, f"{cmd} killed by signal {-proc.returncode} (delay {delay:.2f}s)"
        assert proc.returncode in (0, 2), (proc.returncode, err)
        if proc.returncode == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("optckpt: error: "), err
        if out.exists():  # committed: complete and right
            assert out.read_bytes() == reference[cmd].read_bytes() if cmd == "convert" else \
                _same_state(out, reference[cmd]), (cmd, delay)
        else:
            assert proc.returncode == 2
        key = f"{cmd}:{proc.returncode}:{'written' if out.exists() else 'none'}"
        seen[key] = seen.get(key, 0) + 1
    print("outcomes:", seen)


def _same_state(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return all(torch.equal(x["model"][k], y["model"][k]) for k in y["model"]) and \
        all(torch.equal(x["optimizer"]["state"][i][k], y["optimizer"]["state"][i][k])
            for i in y["optimizer"]["state"] for k in y["optimizer"]["state"][i])
