"""Byte-level fuzz of the loaders, bounded in time.

The real fixtures (a torch bundle, the seed's lone optimizer file, a safetensors file, a Lightning
``.ckpt``) are mutated by hypothesis — bits flipped (anywhere, or in the structural bytes: the pickle
and the zip central directory, the safetensors header), truncation, spans inserted / deleted /
overwritten, the safetensors header length overwritten, garbage prefixes — and fed to
``optckpt inspect --format json`` (and, for the seed optimizer, ``optckpt check --target names.json``).

The contract (README, "Exit codes"): exit 0 (1 for ``check``: differences) with valid JSON on stdout,
or exit 2 with exactly one line ``optckpt: error: ...`` on stderr, no traceback; never anything else,
never an uncaught exception (``invoke`` does not catch them), never a hang (a per-run alarm).

Errors that reach the CLI's last-resort handler (``optckpt: error: unexpected <Type>: ...``) keep the
contract's shape but mean a loader let a foreign exception through: the fuzz fails on them. Python
warnings are recorded apart from stderr (so the outcome does not depend on pytest's warnings plugin) and
counted; what they do to a real command line is ``test_torch_warning_keeps_error_one_line``. The three
regression tests at the end are inputs the fuzz found (each failed before the loaders were fixed).

``pytest -s`` prints the counters (mutated inputs tried, exit codes, last-resort errors, warnings).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZED = {
    "bundle": FIXTURES / "bundle.pt",
    "seed-optimizer": FIXTURES / "seed" / "optimizer_0.pth",
    "safetensors": FIXTURES / "model.safetensors",
    "lightning": FIXTURES / "lightning" / "last.ckpt",
}
SEED_MODEL = FIXTURES / "seed" / "model_0.pth"
MAX_EXAMPLES = 60
RUN_TIMEOUT_S = 30  # one CLI run on a ~15 kB file takes milliseconds; this only turns a hang into a failure

COUNTS: Counter[str] = Counter()


# --- mutations ------------------------------------------------------------------------------------

def structural_spans(data: bytes, path: Path) -> list[tuple[int, int]]:
    """Where the format's own structure lives: the pickle (data.pkl's bytes) and the central directory
    of a torch zip, the length + JSON header of a safetensors file."""
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            first = z.infolist()[0]  # data.pkl comes first in torch.save files (stored, not compressed)
            assert first.filename.endswith("data.pkl") and first.compress_type == zipfile.ZIP_STORED
            pkl_start = first.header_offset + 30 + len(first.filename.encode()) + len(first.extra)
            return [(pkl_start, pkl_start + first.compress_size), (z.start_dir, len(data))]
    n = int.from_bytes(data[:8], "little")
    return [(0, min(len(data), 8 + n))]


@st.composite
def offsets(draw: st.DrawFn, spans: list[tuple[int, int]]) -> tuple[int, int]:
    """A position: (span index, or -1 for anywhere; the first span — the pickle, the safetensors
    header — most often), raw offset); resolved against the current length."""
    where = draw(st.sampled_from([0, 0, 0, -1, -1, *range(1, len(spans))]))
    return where, draw(st.integers(0, 2**20))


def _at(where: tuple[int, int], spans: list[tuple[int, int]], length: int) -> int:
    span, raw = where
    lo, hi = (0, length) if span < 0 else spans[span]
    lo, hi = min(lo, length), min(hi, length)
    return lo + raw % (hi - lo) if hi > lo else raw % (length + 1)


PREFIXES = [b"PK\x03\x04", b"\x80\x02", b"\x80\x05", b"{", b"[", b"\x00" * 8, (40).to_bytes(8, "little") + b"{"]


# Bit flips most often: they keep the container intact and so reach the unpickler, the discovery of
# state dicts and the reports on strange content; the other edits mostly break the container.
OP_KINDS = ["flip"] * 5 + ["truncate", "insert", "delete", "overwrite", "header_len", "prefix"]


@st.composite
def mutation_ops(draw: st.DrawFn, spans: list[tuple[int, int]], size: int) -> list[tuple]:
    ops = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(OP_KINDS))
        if kind == "flip":
            ops.append((kind, draw(st.lists(st.tuples(offsets(spans), st.integers(0, 7)), min_size=1, max_size=3))))
        elif kind == "truncate":
            ops.append((kind, draw(offsets(spans))))
        elif kind == "insert":
            ops.append((kind, draw(offsets(spans)), draw(st.binary(min_size=1, max_size=64))))
        elif kind == "delete":
            ops.append((kind, draw(offsets(spans)), draw(st.integers(1, 64))))
        elif kind == "overwrite":
            ops.append((kind, draw(offsets(spans)), draw(st.binary(min_size=1, max_size=32))))
        elif kind == "header_len":
            ops.append((kind, draw(st.one_of(
                st.integers(0, 2**64 - 1), st.integers(0, size + 16),
                st.sampled_from([0, 1, 2, size - 8, size - 7, 2**63, 100 * 1024 * 1024 + 1])))))
        else:
            ops.append((kind, draw(st.one_of(st.binary(min_size=1, max_size=32), st.sampled_from(PREFIXES)))))
    return ops


def apply_ops(data: bytes, ops: list[tuple], spans: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "flip":
            for where, bit in op[1]:
                if b:
                    b[min(_at(where, spans, len(b)), len(b) - 1)] ^= 1 << bit
        elif kind == "truncate":
            del b[_at(op[1], spans, len(b)):]
        elif kind == "insert":
            o = _at(op[1], spans, len(b))
            b[o:o] = op[2]
        elif kind == "delete":
            o = _at(op[1], spans, len(b))
            del b[o:o + op[2]]
        elif kind == "overwrite":
            o = _at(op[1], spans, len(b))
            b[o:o + len(op[2])] = op[2]
        elif kind == "header_len":
            b[0:8] = op[1].to_bytes(8, "little")
        elif kind == "prefix":
            b[0:0] = op[1]
    return bytes(b)


# --- running the CLI under the contract ---------------------------------------------------------------

class RunTimeout(BaseException):
    """Not an Exception: the CLI's catch-all must not swallow it."""


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):  # noqa: ANN001
        raise RunTimeout(f"a CLI run took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_under_contract(label: str, *args: str, ok_codes: tuple[int, ...] = (0,)) -> None:
    with warnings.catch_warnings(record=True) as caught, alarm(RUN_TIMEOUT_S):
        warnings.simplefilter("always")
        r = invoke(*args)
    COUNTS[f"{label}: tried"] += 1
    COUNTS[f"{label}: exit {r.exit_code}"] += 1
    if caught:
        COUNTS["python warnings raised (recorded apart from stderr)"] += len(caught)
        for w in caught:
            COUNTS[f"  warning {w.category.__name__}: {str(w.message)[:60]}"] += 1
    assert r.exit_code in (*ok_codes, 2), (r.exit_code, r.stdout[:500], r.stderr[:500])
    if r.exit_code != 2:
        json.loads(r.stdout)  # stdout holds only JSON
        return
    err = r.stderr
    assert err.startswith("optckpt: error: ") and err.endswith("\n") and err.count("\n") == 1, repr(err[:1000])
    assert "Traceback" not in err
    if "json" in args:  # an error with --format json is one JSON object on stdout, the same message
        out = json.loads(r.stdout)
        assert set(out) == {"schema_version", "error"} and out["error"]["message"] in err, r.stdout[:500]
    else:
        assert r.stdout == "", r.stdout[:500]
    assert not err.startswith("optckpt: error: unexpected "), f"a loader let a foreign exception through: {err}"


FUZZ = settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", list(FUZZED))
@FUZZ
@given(data=st.data())
def test_inspect_mutated_file(tmp_path_factory, name: str, data: st.DataObject) -> None:
    src = FUZZED[name]
    original = src.read_bytes()
    spans = structural_spans(original, src)
    mutated = apply_ops(original, data.draw(mutation_ops(spans, len(original)), label="ops"), spans)
    path = tmp_path_factory.mktemp("fuzz") / src.name
    path.write_bytes(mutated)
    run_under_contract(f"inspect {name}", "inspect", str(path), "--format", "json")


@FUZZ
@given(data=st.data())
def test_check_mutated_seed_optimizer(tmp_path_factory, data: st.DataObject) -> None:
    src = FUZZED["seed-optimizer"]
    original = src.read_bytes()
    spans = structural_spans(original, src)
    mutated = apply_ops(original, data.draw(mutation_ops(spans, len(original)), label="ops"), spans)
    tmp = tmp_path_factory.mktemp("fuzzcheck")
    path = tmp / "optimizer_0.pth"
    path.write_bytes(mutated)
    names = tmp / "names.json"
    order = data.draw(st.sampled_from([["linear1", "linear2"], ["linear2", "linear1"]]), label="order")
    names.write_text(json.dumps([f"{m}.{k}" for m in order for k in ("weight", "bias")]))
    args = ["check", str(path), "--target", str(names), "--format", "json"]
    if data.draw(st.booleans(), label="with --model"):
        args += ["--model", str(SEED_MODEL)]
    run_under_contract("check seed-optimizer", *args, ok_codes=(0, 1))


def test_unmutated_fixtures_pass() -> None:
    """The baseline: every fixture loads (exit 0), and the check verdicts are the expected ones."""
    for name, src in FUZZED.items():
        r = invoke("inspect", str(src), "--format", "json")
        assert r.exit_code == 0, (name, r.stderr)
        json.loads(r.stdout)


def test_print_fuzz_counters() -> None:
    """Visible with ``-s``: how many mutated inputs each command saw and how they ended."""
    tried = sum(v for k, v in COUNTS.items() if k.endswith(": tried"))
    print(f"\nfuzz: {tried} mutated inputs run")
    for k in sorted(COUNTS):
        print(f"  {k}: {COUNTS[k]}")


# --- inputs the fuzz found that broke the contract (regressions) -----------------------------------------

def _mutated_copy(tmp_path: Path, src: Path, edit) -> Path:  # noqa: ANN001
    b = bytearray(src.read_bytes())
    edit(b)
    out = tmp_path / src.name
    out.write_bytes(bytes(b))
    return out


def test_corrupt_zip_version_field_is_a_load_error(tmp_path: Path) -> None:
    """zipfile raises NotImplementedError('zip file version 10.0') for a central-directory entry whose
    'version needed to extract' is > 6.3; ``_check_zip`` (optckpt/io/torchfile.py) once caught only
    BadZipFile / OSError / ValueError, so this reached the CLI's last-resort handler."""
    def edit(b: bytearray) -> None:
        cd = b.find(b"PK\x01\x02")
        b[cd + 6:cd + 8] = (100).to_bytes(2, "little")  # "version needed to extract" = 10.0

    path = _mutated_copy(tmp_path, FIXTURES / "bundle.pt", edit)
    r = invoke("inspect", str(path), "--format", "json")
    assert r.exit_code == 2
    assert r.stderr.startswith(f"optckpt: error: {path}: "), r.stderr  # a LoadError, not "unexpected ..."


def test_corrupt_persistent_id_is_a_load_error(tmp_path: Path) -> None:
    """A corrupt persistent id makes torch.load raise AssertionError('saved_id must be a tuple, got
    int'); ``load_torch_file`` once caught a fixed list of exception types, without it."""
    def edit(b: bytearray) -> None:
        assert b[601] == 0x4B  # BININT1 of a storage's persistent id tuple
        b[601] ^= 0x01  # -> BININT: the bytes after it are read as one int

    path = _mutated_copy(tmp_path, FIXTURES / "seed" / "optimizer_0.pth", edit)
    r = invoke("inspect", str(path), "--format", "json")
    assert r.exit_code == 2
    assert r.stderr.startswith(f"optckpt: error: {path}: "), r.stderr  # a LoadError, not "unexpected ..."


def test_torch_warning_keeps_error_one_line(tmp_path: Path) -> None:
    """For this corrupt pickle torch warns 'TypedStorage is deprecated' (a UserWarning: two lines on
    stderr) before optckpt fails: unless the CLI silences warnings, a real command line prints three
    stderr lines instead of the documented single ``optckpt: error: ...`` line."""
    def edit(b: bytearray) -> None:
        assert b[782] == 0x0B
        b[782] ^= 0x40

    path = _mutated_copy(tmp_path, FIXTURES / "seed" / "optimizer_0.pth", edit)
    # a real command line, as a user runs it (conftest.run_cli sets PYTHONWARNINGS=ignore, users do not)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-m", "optckpt", "inspect", str(path), "--format", "json"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("optckpt: error: "), r.stderr
