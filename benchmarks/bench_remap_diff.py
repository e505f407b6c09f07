"""``optckpt remap`` and ``optckpt diff`` on a GPT-2-small training checkpoint, against the physical
limits measured in the same run.

    python benchmarks/bench_remap_diff.py [--scale 1.0] [--repeats 3] [--tmpdir DIR]

remap   vs  ``cp A B && sync`` (a file copy, flushed to disk; remap's figure includes its own sync),
            and vs the naive script people write
            (``torch.load`` without mmap, re-key the optimizer state, ``torch.save``);
            optckpt with its default re-read verification and with ``--no-verify``;
diff    vs  ``cat A B > /dev/null`` (reading both files), with max-abs and relative error computed;
memory  peak RssAnon (private memory; mmapped file pages are page cache), sampled every 5 ms from
        outside, against the largest tensor; interpreter + ``import torch`` start-up is excluded (each
        optckpt / naive process times its work after its imports) and reported apart.
Warm cache: each input is read once before the measurements. Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_inspect import build_checkpoint, gpt2_layout  # noqa: E402

# Each measured command runs in a fresh process that imports torch and optckpt first and times only
# the work after that (written to the file named by BENCH_TIME): start-up never pollutes the figure.
TIMED = r"""
import os, sys, time, warnings
warnings.simplefilter("ignore")
import torch, optckpt.cli
t0 = time.perf_counter()
code = 0
try:
    if sys.argv[1] == "naive":
        sys.argv = sys.argv[1:]
        exec(compile(NAIVE, "naive", "exec"))
    else:
        sys.argv = ["optckpt", *sys.argv[1:]]
        optckpt.cli.main()
except SystemExit as e:
    code = e.code or 0
open(os.environ["BENCH_TIME"], "w").write(str(time.perf_counter() - t0))
sys.exit(code)
"""

NAIVE = r"""
import sys, torch
src, dst, perm = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
ck = torch.load(src, weights_only=True, map_location="cpu")
st = ck["optimizer"]["state"]
ck["optimizer"]["state"] = {new: st[old] for new, old in enumerate(perm) if old in st}
torch.save(ck, dst)
"""


def timed(args: list[str], tmp: str) -> tuple[float, int, subprocess.CompletedProcess[bytes]]:
    """Run a TIMED command; return (seconds of work after imports, peak RssAnon KiB, result)."""
    stamp = os.path.join(tmp, "t.txt")
    env = dict(os.environ, BENCH_TIME=stamp)
    _, peak, res = peak_rss_anon([sys.executable, "-c", f"NAIVE = {NAIVE!r}\n" + TIMED, *args], env=env)
    with open(stamp) as f:
        return float(f.read()), peak, res


def peak_rss_anon(cmd: list[str], **kw: object) -> tuple[float, int, subprocess.CompletedProcess[bytes]]:
    """Run ``cmd``; return (seconds, peak RssAnon in KiB, result), sampling /proc every 5 ms."""
    peak = 0
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        path = f"/proc/{p.pid}/status"
        while not done.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    elapsed = time.perf_counter() - t0
    done.set()
    th.join()
    return elapsed, peak, subprocess.CompletedProcess(cmd, p.returncode, out, err)


def warm(*paths: str) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="optckpt-bench-", dir=args.tmpdir)
    py = sys.executable
    try:
        a = os.path.join(tmp, "a.pt")
        truth, n_params = build_checkpoint(a, args.scale)
        size = os.path.getsize(a)
        layout, _ = gpt2_layout(args.scale)
        largest = max(4 * _numel(s) for _, s in layout)
        # the new code: the no-decay group first (a changed param-group construction), reversed order inside
        order = [truth[i] for i in sorted(truth)]
        n_decay = sum(1 for _, s in layout if len(s) >= 2)
        new_groups = [order[n_decay:][::-1], order[:n_decay][::-1]]
        names = os.path.join(tmp, "target.json")
        with open(names, "w") as f:
            json.dump(new_groups, f)
        index_of = {n: i for i, n in truth.items()}
        perm = ",".join(str(index_of[n]) for g in new_groups for n in g)
        # B for diff: the same checkpoint re-saved with one perturbed tensor
        b = os.path.join(tmp, "b.pt")
        subprocess.run([py, "-c", "import torch,sys; ck=torch.load(sys.argv[1], weights_only=True, mmap=True);"
                        "w='transformer.h.3.mlp.c_fc.weight'; ck['model'][w] = ck['model'][w] + 1e-3;"
                        "torch.save(ck, sys.argv[2])", a, b], check=True)
        warm(a, b)
        subprocess.run(["sync"], check=True)  # no writeback of the inputs left to bill to the first copy
        rows: dict[str, list[float]] = {k: [] for k in (
            "startup", "cp+sync", "naive", "remap", "remap --no-verify", "cat A B", "diff")}
        mem: dict[str, int] = {}
        for r in range(args.repeats):
            out = os.path.join(tmp, f"out{r}.pt")
            t, m, _ = peak_rss_anon([py, "-c", "import torch, optckpt.cli"])
            rows["startup"].append(t)
            mem["startup"] = max(mem.get("startup", 0), m)
            t0 = time.perf_counter()
            subprocess.run(["cp", a, out], check=True)
            subprocess.run(["sync"], check=True)
            rows["cp+sync"].append(time.perf_counter() - t0)
            os.unlink(out)
            t, m, res = timed(["naive", a, out, perm], tmp)
            assert res.returncode == 0, res.stderr
            t1 = time.perf_counter()
            subprocess.run(["sync"], check=True)
            rows["naive"].append(t + time.perf_counter() - t1)
            mem["naive"] = max(mem.get("naive", 0), m)
            os.unlink(out)
            for label, extra in (("remap", []), ("remap --no-verify", ["--no-verify"])):
                t, m, res = timed(["remap", a, "--target", names, "-o", out, *extra], tmp)
                assert res.returncode == 0, res.stderr
                t1 = time.perf_counter()
                subprocess.run(["sync"], check=True)
                rows[label].append(t + time.perf_counter() - t1)
                mem[label] = max(mem.get(label, 0), m)
                os.unlink(out)
            t0 = time.perf_counter()
            subprocess.run(f"cat {a} {b} > /dev/null", shell=True, check=True)
            rows["cat A B"].append(time.perf_counter() - t0)
            t, m, res = timed(["diff", a, b, "--format", "json"], tmp)
            assert res.returncode == 1, res.stderr
            rows["diff"].append(t)
            mem["diff"] = max(mem.get("diff", 0), m)
        report = json.loads(res.stdout)
        changed = [(e["section"], e["name"]) for e in report["entries"]]
        assert changed == [("model", "transformer.h.3.mlp.c_fc.weight")], changed[:5]

        s = med(rows["startup"])
        net = {k: max(med(v), 1e-9) for k, v in rows.items()}  # optckpt / naive: timed after their imports
        print(f"checkpoint {size / 2**30:.2f} GiB, {n_params / 1e6:.0f}M params + AdamW, largest tensor "
              f"{largest / 2**20:.0f} MiB; median of {args.repeats}; start-up (python + import torch + optckpt) "
              f"{s:.2f} s, excluded from the optckpt / naive figures (timed after their imports)")
        print(f"{'measurement':28s} {'median s':>9s} {'net s':>8s} {'peak RssAnon':>13s}")
        for k, v in rows.items():
            extra = f"{(mem.get(k, 0) - mem.get('startup', 0)) / 1024:10.0f} MiB" if k in mem and k != "startup" else ""
            print(f"{k:28s} {med(v):9.2f} {net[k]:8.2f} {extra:>13s}")
        print("ratios (net):")
        print(f"  remap / (cp+sync)            = {net['remap'] / net['cp+sync']:.2f}   (goal <= 1.2)")
        print(f"  remap --no-verify / (cp+sync) = {net['remap --no-verify'] / net['cp+sync']:.2f}")
        print(f"  remap / naive                = {net['remap'] / net['naive']:.2f}   (goal <= 0.3)")
        print(f"  diff / cat A B               = {net['diff'] / net['cat A B']:.2f}   (goal <= 1.5)")
        for k in ("remap", "diff", "naive"):
            extra_mb = (mem[k] - mem["startup"]) / 1024
            print(f"  extra private memory of {k:6s} = {extra_mb:.0f} MiB = {extra_mb * 2**20 / largest:.2f} x largest "
                  f"tensor (goal <= max(64 MB, 2x largest))")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
