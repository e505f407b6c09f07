"""In-place edits timed as the user meets them, and how they scale with the file's size.

    python benchmarks/bench_in_place.py [--cases issue,issue10] [--repeats 3] [--tmpdir DIR]

``--in-place`` on a torch zip file appends a new version (a new pickle and central directory; the
tensor records stay where they are), so its cost should follow the pickle, not the data. Measured,
each a whole process minus a ``python -c "import torch"`` process run just before it (as in
``bench_process.py``), median of --repeats rounds, commands interleaved round by round:

* ``remap --in-place`` (every parameter moves: the target order alternates between reversed and
  forward, so each round is a full reorder of the file the previous round wrote) + ``sync``
* ``set --lr --in-place`` (the pickle only; alternating values) + ``sync``
* ``remap --in-place --no-verify`` (the order back again), to show what the read-back costs
* the baseline ``cp A OUT && sync`` (OUT pre-existing), and ``remap -o OUT`` (a copied output) + ``sync``,
  both run before the in-place edits of the round (A itself is edited in place: two files on disk)

Cases: the 1.53 GB bundle of issue #20 (469 parameters, 1,876 storages: ``bench_process.py``'s
``issue``) and the same layout with d = 1640 instead of 512 (10.2x the bytes, same storage count).
Tensors are zeros taken from an anonymous mapping (``torch.frombuffer``: one storage each, no
memory until written), so that the 15 GB file can be built on a 24 GB machine; the edits never read
tensor data, the baselines read all of it. The file grows by one pickle per in-place round."""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_process import NAIVE, WRAP, layout, run  # noqa: E402

CASES = {"small": (128, 4), "issue": (512, 39), "issue10": (1640, 39)}


def build(path: str, d: int, blocks: int) -> list[str]:
    import torch

    lay = layout(d, blocks)
    sizes = [n for _, s in lay for n in [_numel(s)] * 3]  # param, exp_avg, exp_avg_sq
    buf = mmap.mmap(-1, 4 * sum(sizes))
    at = 0

    def zeros(shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal at
        n = _numel(shape)
        t = torch.frombuffer(buf, dtype=torch.float32, count=n, offset=at).view(shape)
        at += 4 * n
        return t

    model = {n: zeros(s) for n, s in lay}
    state = {i: {"step": torch.tensor(10.0), "exp_avg": zeros(s), "exp_avg_sq": zeros(s)}
             for i, (_, s) in enumerate(lay)}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
               "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
               "fused": None, "decoupled_weight_decay": False, "params": list(range(len(lay)))}]
    torch.save({"model": model, "optimizer": {"state": state, "param_groups": groups}, "epoch": 1}, path)
    return [n for n, _ in lay]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def bench_case(name: str, d: int, blocks: int, repeats: int, tmp: str) -> dict[str, object]:
    py = sys.executable
    a, out = os.path.join(tmp, "a.pt"), os.path.join(tmp, "out.pt")
    ip, cp_out = a, out  # two files only (the 15 GB case on a 70 GB disk): A is edited in place after the copies
    names = build(a, d, blocks)
    targets = []
    for tag, order in (("rev", names[::-1]), ("fwd", names)):
        targets.append(os.path.join(tmp, f"target-{tag}.json"))
        with open(targets[-1], "w") as f:
            json.dump(order, f)
    stamp = os.path.join(tmp, "t.txt")
    env = dict(os.environ, BENCH_TIME=stamp)
    wrap = [py, "-c", f"NAIVE = {NAIVE!r}\n" + WRAP]
    size0 = os.path.getsize(a)
    subprocess.run([*wrap, "remap", a, "--target", targets[0], "-o", out, "--format", "json"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["sync"], check=True)
    walls: dict[str, list[float]] = {}
    after: dict[str, list[float]] = {}

    def synced(cmd: list[str] | str, **kw: object) -> float:
        t, _ = run(cmd, **kw)  # type: ignore[arg-type]
        t1, _ = run(["sync"])
        return t + t1

    def py_rec(label: str, cmd: list[str]) -> None:
        base, _ = run([py, "-c", "import torch"])
        walls.setdefault("import torch", []).append(base)
        walls.setdefault(label, []).append(synced(cmd, env=env) - base)
        with open(stamp) as f:
            after.setdefault(label, []).append(float(f.read()))

    for r in range(repeats):
        walls.setdefault("cp A OUT && sync", []).append(synced(["cp", a, cp_out]))
        py_rec("remap -o OUT", [*wrap, "remap", a, "--target", targets[0], "-o", out, "--format", "json"])
        py_rec("remap --in-place", [*wrap, "remap", ip, "--target", targets[r % 2], "--in-place", "--format", "json"])
        py_rec("set --in-place", [*wrap, "set", ip, "--lr", f"{0.01 + r / 1000:.3f}", "--in-place",
                                  "--format", "json"])
        py_rec("remap --in-place --no-verify", [*wrap, "remap", ip, "--target", targets[(r + 1) % 2], "--in-place",
                                                "--no-verify", "--format", "json"])
    net = {k: statistics.median(v) for k, v in walls.items() if k != "import torch"}
    aft = {k: statistics.median(v) for k, v in after.items()}
    cp = net["cp A OUT && sync"]
    res: dict[str, object] = {
        "case": name, "d": d, "params": len(names), "storages": 4 * len(names), "bytes": size0,
        "grown_bytes": os.path.getsize(ip) - size0, "import_torch_s": statistics.median(walls["import torch"]),
        "net_s": net, "after_import_s": aft,
        "ratios": {f"{k} / (cp && sync)": v / cp for k, v in net.items() if k != "cp A OUT && sync"},
    }
    for p in (a, out):
        os.unlink(p)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="issue,issue10")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="optckpt-bench-inplace-", dir=args.tmpdir)
    results = []
    try:
        for name in args.cases.split(","):
            r = bench_case(name, *CASES[name], args.repeats, tmp)
            results.append(r)
            if not args.json:
                show(r, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len(results) == 2 and not args.json:
        n0, n1 = (dict(r["net_s"]) for r in results)  # type: ignore[call-overload]
        b0, b1 = (int(r["bytes"]) for r in results)  # type: ignore[call-overload]
        print(f"\n{results[1]['case']} / {results[0]['case']}: {b1 / b0:.1f}x the bytes;")
        for k in n0:
            print(f"  {k:30s} {n1[k] / n0[k]:.2f}x the time")
    if args.json:
        print(json.dumps(results, indent=1))


def show(r: dict[str, object], repeats: int) -> None:
    net, aft = dict(r["net_s"]), dict(r["after_import_s"])  # type: ignore[call-overload]
    print(f"\n== {r['case']}: {r['params']} parameters, {r['storages']} storages, {int(r['bytes']) / 1e9:.2f} GB "  # type: ignore[call-overload]
          f"(in-place file grew {int(r['grown_bytes']) / 1e6:.1f} MB over {2 * repeats} edits); median of {repeats}; "  # type: ignore[call-overload]
          f"python -c 'import torch' (median {r['import_torch_s']:.2f} s) subtracted pairwise")
    print(f"{'command':30s} {'whole-process s':>16s} {'after-import s':>15s}")
    for k, v in net.items():
        print(f"{k:30s} {v:16.2f} {aft[k]:15.2f}" if k in aft else f"{k:30s} {v:16.2f}")
    for k, v in dict(r["ratios"]).items():  # type: ignore[call-overload]
        print(f"  {k:42s} = {v:.3f}")


if __name__ == "__main__":
    main()
