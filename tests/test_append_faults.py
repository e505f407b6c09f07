"""In-place edits are crash-safe: SIGKILL at random moments, and at every write the edit makes.

A torch zip file edited ``--in-place`` gets its new version appended (``optckpt/io/append.py``).
Whatever moment the process dies, ``torch.load(weights_only=True)`` must give either the old
content or the new one (the new one being exactly what the same edit writes to a new file with
``-o``), and ``optckpt restore`` must give back the original bytes.

The edits run in real ``optckpt`` processes (the CLI's ``main``), forked from one helper that has
already imported torch, so that a trial costs milliseconds instead of a torch import; they are
killed with SIGKILL by this test (random moments), or kill themselves with SIGKILL just after
their k-th write or fsync (every step; a write of more than a page torn in half first, as a
fatal signal can stop one between pages)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

_ZYGOTE = r'''
import json, os, signal, sys, time
import torch
import optckpt.cli, optckpt.io.append  # noqa: F401  (imported once, before the forks)
import optckpt.cmd_remap, optckpt.cmd_reset, optckpt.cmd_set  # noqa: F401

def trial(req):
    kill_after = req.get("kill_after")
    if kill_after is not None:  # die by SIGKILL during the k-th write/fsync
        count = [0]
        real_pwrite, real_fsync = os.pwrite, os.fsync
        def dying(k):
            count[0] += 1
            return count[0] == kill_after
        def pwrite(fd, data, offset):
            view = memoryview(data).cast("B")
            if dying(count):
                if len(view) > 512:  # a write of more than a page can stop between pages: a torn write
                    real_pwrite(fd, view[:len(view) // 2], offset)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_pwrite(fd, view, offset)
        def fsync(fd):
            if dying(count):
                os.kill(os.getpid(), signal.SIGKILL)
            real_fsync(fd)
        os.pwrite, os.fsync = pwrite, fsync
    sys.argv = ["optckpt", *req["argv"]]
    try:
        optckpt.cli.main()
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    os._exit(0)

for line in sys.stdin:
    req = json.loads(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        trial(req)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status, "signal": os.WIFSIGNALED(status), "seconds": time.monotonic() - t0}),
          flush=True)
'''

_TARGET = '''
import torch

def build():
    torch.manual_seed(1)
    return torch.nn.Sequential(*[torch.nn.Linear(64 + i, 64 + i + 1) for i in range(24)], torch.nn.Linear(89, 7))
'''


class Zygote:
    def __init__(self, root: Path) -> None:
        script = root / "zygote.py"
        script.write_text(_ZYGOTE)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=root)

    def run(self, argv: list[str], *, kill_at: float | None = None, kill_after: int | None = None) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "kill_after": kill_after}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if kill_at is not None:
            time.sleep(kill_at)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64 + i, 64 + i + 1) for i in range(24)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, path)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


EDITS = {
    "remap": ["remap", "{p}", "--target", "{target}:build"],  # pickle, model keys and a new layer's tensors
    "set": ["set", "{p}", "--lr", "0.02"],  # the pickle only
    "reset": ["reset", "{p}", "--params", "*", "--mode", "zero"],  # every state tensor re-written: a long append
    "reset-one": ["reset", "{p}", "--params", "3.*", "--mode", "zero"],  # a few new tensors
}
EVERY_WRITE = ["remap", "set", "reset-one"]  # (the long reset makes ~200 writes: covered by the random kills)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("append_faults")
    _checkpoint(root / "orig.pt")
    (root / "target.py").write_text(_TARGET)
    z = Zygote(root)
    truth = {}
    for name, argv in EDITS.items():
        out = root / f"copied-{name}.pt"
        args = [a.format(p=root / "orig.pt", target=root / "target.py") for a in argv] + ["-o", str(out)]
        r = z.run(args)
        assert r["status"] == 0, (name, r)
        truth[name] = torch.load(out, weights_only=True)
    yield root, z, truth
    z.close()


def _trial_file(root: Path, name: str) -> tuple[Path, list[str]]:
    p = root / f"trial-{name}.pt"
    shutil.copyfile(root / "orig.pt", p)
    argv = [a.format(p=p, target=root / "target.py") for a in EDITS[name]] + ["--in-place"]
    return p, argv


def _outcome(p: Path, old, new) -> str:
    got = torch.load(p, weights_only=True)  # must load, whatever the moment of death
    if _same(got, new):
        return "new"
    assert _same(got, old), "a killed in-place edit left content that is neither the old nor the new"
    return "old"


def _restore_is_exact(root: Path, p: Path, z: Zygote) -> None:
    if p.stat().st_size != (root / "orig.pt").stat().st_size:
        assert z.run(["restore", str(p)])["status"] == 0
    assert p.read_bytes() == (root / "orig.pt").read_bytes()


def test_uninterrupted_in_place_edit_equals_the_copied_output(setup):
    root, z, truth = setup
    for name in EDITS:
        p, argv = _trial_file(root, name)
        assert z.run(argv)["status"] == 0
        assert _same(torch.load(p, weights_only=True), truth[name])
        assert p.read_bytes().startswith((root / "orig.pt").read_bytes())
        _restore_is_exact(root, p, z)


@pytest.mark.parametrize("kills", [8, pytest.param(32, marks=pytest.mark.slow)])
def test_sigkill_at_random_moments(setup, kills):
    """Edits killed at random moments (uniform over the measured duration of that edit), until
    ``kills`` of them died before they finished (8 in the default run, 32 with ``-m slow``)."""
    root, z, truth = setup
    old = torch.load(root / "orig.pt", weights_only=True)
    rng = random.Random(20261201)
    durations = {}
    for name in EDITS:
        p, argv = _trial_file(root, name)
        durations[name] = z.run(argv)["seconds"]
    seen: dict[str, int] = {"killed": 0}
    for i in range(200):
        if seen["killed"] >= kills:
            break
        name = list(EDITS)[i % len(EDITS)]
        p, argv = _trial_file(root, name)
        r = z.run(argv, kill_at=rng.uniform(0.0, 1.1 * durations[name]))
        outcome = _outcome(p, old, truth[name])
        seen["killed"] += bool(r["signal"])
        seen[outcome] = seen.get(outcome, 0) + 1
        _restore_is_exact(root, p, z)
        if outcome != "new":  # the edit runs to the end when run again after a restore
            assert z.run(argv)["status"] == 0 and _same(torch.load(p, weights_only=True), truth[name])
    print("outcomes:", seen, "durations:", durations)
    assert seen["killed"] >= kills, seen


@pytest.mark.parametrize("name", EVERY_WRITE)
def test_sigkill_after_every_write(setup, name):
    """Killed during each of the edit's writes and fsyncs in turn: old content up to the commit
    write, new content from it on, never anything else."""
    root, z, truth = setup
    old = torch.load(root / "orig.pt", weights_only=True)
    outcomes = []
    k = 1
    while True:
        p, argv = _trial_file(root, name)
        r = z.run(argv, kill_after=k)
        if not r["signal"]:  # fewer writes than k: the edit completed
            assert r["status"] == 0
            assert _outcome(p, old, truth[name]) == "new"
            break
        outcomes.append(_outcome(p, old, truth[name]))
        if outcomes[-1] == "old" and p.stat().st_size != (root / "orig.pt").stat().st_size:
            r2 = subprocess.run([sys.executable, "-m", "optckpt", "inspect", str(p)], capture_output=True,
                                text=True, cwd=ROOT) if k == 2 else None
            if r2 is not None:  # the interrupted state is named, in one line, with the way out
                assert r2.returncode == 2 and "optckpt restore" in r2.stderr and len(r2.stderr.splitlines()) == 1
        _restore_is_exact(root, p, z)
        k += 1
        assert k < 10_000
    assert "old" in outcomes and "new" in outcomes, outcomes
    first_new = outcomes.index("new")
    assert all(o == "old" for o in outcomes[:first_new]) and all(o == "new" for o in outcomes[first_new:]), outcomes


def test_pending_end_records_are_named_by_what_became_of_them(tmp_path):
    """A read that saw an edit's end records pending: if that edit has finished by the time the lock is
    looked at (it released it), the message is "another edit", not "interrupted" (six concurrent edits
    met this race); still pending with nobody holding the lock, it is an interrupted edit to restore."""
    from conftest import invoke

    from optckpt.io.editlock import interrupted_message

    p = tmp_path / "ck.pt"
    _checkpoint(p)
    before = p.stat().st_size
    assert invoke("set", str(p), "--lr", "0.3", "--in-place").exit_code == 0
    size = p.stat().st_size
    finished = interrupted_message(str(p), before, size)
    assert "another optckpt edit wrote this file in place while this one was reading it" in finished, finished
    data = bytearray(p.read_bytes())
    at = data.rindex(b"optckpt-prev:")
    data[at:at + 13] = b"optckpt-pend:"  # the same end records as step 1 leaves them: killed before step 3
    p.write_bytes(bytes(data))
    killed = interrupted_message(str(p), before, size)
    assert "was interrupted" in killed and f"optckpt restore {p}" in killed, killed
    r = invoke("inspect", str(p))
    assert r.exit_code == 2 and "was interrupted" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    import fcntl

    fd = os.open(p, os.O_RDWR)
    try:  # the lock held: by another edit, or by this process's own append (which then knows it was a killed one)
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "another optckpt edit is writing" in interrupted_message(str(p), before, size)
        assert "was interrupted" in interrupted_message(str(p), before, size, locked=True)
    finally:
        os.close(fd)


def test_a_second_in_place_writer_is_refused_while_one_appends(tmp_path):
    import fcntl

    from optckpt.errors import WriteError
    from optckpt.io.append import append_version

    p = tmp_path / "ck.pt"
    _checkpoint(p)
    before = p.read_bytes()
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as an edit in progress holds it
        with pytest.raises(WriteError, match="another optckpt edit"):
            append_version(str(p), torch.load(p, weights_only=True, mmap=True))
    finally:
        os.close(fd)
    assert p.read_bytes() == before


def test_an_edit_prepared_on_an_older_version_is_refused(tmp_path):
    """Another in-place edit landed between this edit's read and its write: refused, not overridden."""
    from conftest import invoke

    import optckpt
    from optckpt.errors import WriteError
    from optckpt.io.write import write_checkpoint

    p = tmp_path / "ck.pt"
    _checkpoint(p)
    ck = optckpt.load(p)
    assert invoke("set", str(p), "--lr", "0.3", "--in-place").exit_code == 0
    landed = p.read_bytes()
    part = ck.parts[0]
    with pytest.raises(WriteError, match="another optckpt edit wrote this file in place while this one was running"):
        write_checkpoint(ck, str(p), {part.relpath: part.obj}, in_place=True)
    assert p.read_bytes() == landed


@pytest.mark.slow
def test_concurrent_in_place_edits_end_in_one_line_or_a_verified_version(tmp_path):
    """Six real `set --in-place` processes on one file at once, three times: each either lands (its
    version verified, appended after the others) or is refused with the one "another edit" line;
    the file always loads, holding one of the requested values."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for trial in range(3):
        p = tmp_path / f"b{trial}.pt"
        shutil.copy(ROOT / "fixtures" / "bundle.pt", p)
        lrs = [0.01 * (i + 1) for i in range(6)]
        procs = [subprocess.Popen([sys.executable, "-m", "optckpt", "set", str(p), "--lr", str(lr), "--in-place"],
                                  env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for lr in lrs]
        results = [(q.wait(timeout=300), q.stderr.read() if q.stderr else "") for q in procs]
        assert any(code == 0 for code, _ in results)
        for code, err in results:
            # the loser either met the winner's lock ("is writing this file") or found its version
            # already appended to what it had read ("wrote this file in place while this one was running")
            assert code in (0, 2) and (code == 0 or (err.count("\n") == 1 and "another optckpt edit" in err)), err
        got = torch.load(p, weights_only=True)["optimizer"]["param_groups"][0]["lr"]
        assert any(abs(got - lr) < 1e-12 for lr in lrs), got
